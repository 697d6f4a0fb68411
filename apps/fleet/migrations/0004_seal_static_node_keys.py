"""Static node keys were kept in clear in ``launcher_state``; seal them (apps.fleet.keys)."""

from django.db import migrations

LEGACY, SEALED = "static_api_key", "static_api_key_sealed"


def seal(apps, schema_editor):
    from apps.fleet.keys import seal_static_key

    Node = apps.get_model("fleet", "Node")
    for node in Node.objects.filter(launcher_state__has_key=LEGACY).only("pk", "launcher_state"):
        state = dict(node.launcher_state)
        plain = state.pop(LEGACY)
        if plain:
            state[SEALED] = seal_static_key(str(plain))
        Node.objects.filter(pk=node.pk).update(launcher_state=state)


class Migration(migrations.Migration):
    dependencies = [("fleet", "0003_beat_schedules")]

    # No way back: the clear-text keys are not written again.
    operations = [migrations.RunPython(seal, migrations.RunPython.noop)]
