"""Rename the class Model to ServedModel, keeping the table ``catalog_model``.

State only (SeparateDatabaseAndState): a plain RenameModel would rename the table and then
AlterModelTable rename it back, and re-create the foreign keys of fleet_node and
metering_usagerecord on the way (a validating scan of the usage table). The content type and the
permission codenames (change_model -> change_servedmodel, ...) are renamed here, as Django does
for a plain RenameModel, so staff keep the permissions their groups hold.
"""

from django.db import migrations

ACTIONS = ("add", "change", "delete", "view")


def _rename(apps, old: str, new: str, verbose: str) -> None:
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    content_type = ContentType.objects.filter(app_label="catalog", model=old).first()
    if content_type is None or ContentType.objects.filter(app_label="catalog", model=new).exists():
        return  # a fresh database (post_migrate creates them), or already renamed
    content_type.model = new
    content_type.save(update_fields=["model"])
    for action in ACTIONS:
        Permission.objects.filter(content_type=content_type, codename=f"{action}_{old}").update(
            codename=f"{action}_{new}", name=f"Can {action} {verbose}",
        )


def forwards(apps, schema_editor):
    _rename(apps, "model", "servedmodel", "served model")


def backwards(apps, schema_editor):
    _rename(apps, "servedmodel", "model", "model")


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0006_drop_job_columns'),
        ('contenttypes', '0002_remove_content_type_name'),
        ('auth', '0012_alter_user_first_name_max_length'),
        ('fleet', '0004_seal_static_node_keys'),
        ('metering', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterModelTable(name='model', table='catalog_model'),
                migrations.RenameModel(old_name='Model', new_name='ServedModel'),
            ],
            database_operations=[],
        ),
        migrations.RunPython(forwards, backwards),
    ]
