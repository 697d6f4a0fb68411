"""Node keys: derived per node, or for a static node sealed at rest and unsealed for routing."""

from __future__ import annotations

import importlib
import json

import pytest
from django.apps import apps as django_apps

from apps.fleet.keys import SEALED_STATIC_KEY, node_api_key, presented_key, seal_static_key, static_key
from apps.fleet.models import Node
from apps.fleet.services import node_create


def test_a_sealed_key_round_trips_and_is_not_readable_at_rest():
    sealed = seal_static_key("sk-node-secret")

    assert "sk-node-secret" not in sealed
    assert static_key(1, {SEALED_STATIC_KEY: sealed}) == "sk-node-secret"
    assert presented_key(1, "static", {SEALED_STATIC_KEY: sealed}) == "sk-node-secret"


def test_other_launchers_and_keyless_static_nodes_get_the_derived_key():
    sealed = seal_static_key("sk-node-secret")

    assert presented_key(7, "skypilot", {SEALED_STATIC_KEY: sealed}) == node_api_key(7)
    assert presented_key(7, "static", {}) == node_api_key(7)


def test_a_key_sealed_under_another_secret_is_refused_with_a_logged_reason(settings, caplog):
    sealed = seal_static_key("sk-node-secret")
    settings.NODE_KEY_SECRET = "rotated-" + settings.NODE_KEY_SECRET

    assert static_key(3, {SEALED_STATIC_KEY: sealed}) is None
    assert "node 3: its static API key cannot be unsealed" in caplog.text


@pytest.mark.django_db
def test_the_migration_seals_keys_stored_in_clear(catalog_model):
    node = node_create(model=catalog_model, launcher="static", endpoint_url="http://10.0.0.9:8000")
    Node.objects.filter(pk=node.pk).update(launcher_state={"static_api_key": "sk-legacy", "note": "kept"})
    migration = importlib.import_module("apps.fleet.migrations.0004_seal_static_node_keys")

    migration.seal(django_apps, None)

    state = Node.objects.get(pk=node.pk).launcher_state
    assert "sk-legacy" not in json.dumps(state) and state["note"] == "kept"
    assert static_key(node.pk, state) == "sk-legacy"
