"""Tenants: hashed keys, revocation, quotas, the edge parse, and keys never reaching logs."""

from __future__ import annotations

import json
import logging

import pytest

from deployments.config import ServiceConfig
from deployments.errors import status_of
from deployments.tenants import (
    ANONYMOUS,
    ENV_VAR,
    Quota,
    TenantGate,
    TenantRegistry,
    hash_secret,
    load_registry,
    parse_registry,
    split_key,
    tenants_main,
    verify_secret,
)
from stages.errors import AdmissionRefusedError, UnauthenticatedError


@pytest.fixture(scope="module")
def registry_and_keys():
    reg, acme = TenantRegistry().add_key("acme", tier="premium", quota=Quota(max_streams=2, max_pixels=64 * 96,
                                                                              max_steps=2))
    reg, free = reg.add_key("hobby", tier="free", quota=Quota(max_streams=1))
    return reg, acme, free


def test_keys_are_stored_only_as_salted_hashes(registry_and_keys):
    reg, acme, free = registry_and_keys
    text = json.dumps(reg.to_dict())
    for raw in (acme, free):
        key_id, secret = split_key(raw)
        assert secret not in text and raw not in text
        assert key_id in text
    h1, h2 = hash_secret("same"), hash_secret("same")
    assert h1 != h2  # salted
    assert verify_secret("same", h1) and verify_secret("same", h2)
    assert not verify_secret("other", h1)
    assert not verify_secret("same", "scrypt$garbage")


def test_valid_keys_authenticate_to_their_tenant(registry_and_keys):
    reg, acme, free = registry_and_keys
    assert reg.authenticate(acme).name == "acme" and reg.authenticate(acme).tier == "premium"
    assert reg.authenticate(free).name == "hobby"


@pytest.mark.parametrize("bad", ["", "nope", "weir__x", "weir_deadbeef_notthesecret"])
def test_missing_malformed_and_unknown_keys_are_unauthenticated(registry_and_keys, bad):
    reg, _, _ = registry_and_keys
    with pytest.raises(UnauthenticatedError) as err:
        reg.authenticate(bad)
    assert status_of(err.value).code.name == "UNAUTHENTICATED"


def test_wrong_secret_for_a_known_id_is_unauthenticated(registry_and_keys):
    reg, acme, _ = registry_and_keys
    key_id, secret = split_key(acme)
    with pytest.raises(UnauthenticatedError) as err:
        reg.authenticate(f"weir_{key_id}_{secret[:-1]}x")
    assert secret not in str(err.value)


def test_revoked_key_is_refused_and_other_keys_still_work(registry_and_keys):
    reg, acme, free = registry_and_keys
    reg2, acme2 = reg.add_key("acme")
    revoked = reg2.revoke(split_key(acme)[0])
    with pytest.raises(UnauthenticatedError, match="revoked"):
        revoked.authenticate(acme)
    assert revoked.authenticate(acme2).name == "acme"
    assert revoked.authenticate(free).name == "hobby"
    with pytest.raises(KeyError):
        revoked.revoke("00000000")


def test_quotas_refuse_with_resource_exhausted_naming_the_quota(registry_and_keys):
    reg, acme, _ = registry_and_keys
    gate = TenantGate(reg)
    tenant = gate.authenticate(acme)
    with pytest.raises(AdmissionRefusedError, match="max_pixels") as err:
        gate.acquire(tenant, height=128, width=128, num_steps=1)
    assert err.value.details["quota"] == "max_pixels"
    assert status_of(err.value).code.name == "RESOURCE_EXHAUSTED"
    with pytest.raises(AdmissionRefusedError, match="max_steps"):
        gate.acquire(tenant, height=64, width=96, num_steps=3)
    gate.acquire(tenant, height=64, width=96, num_steps=2)
    gate.acquire(tenant, height=64, width=64, num_steps=1)
    with pytest.raises(AdmissionRefusedError, match="max_streams=2") as err:
        gate.acquire(tenant, height=64, width=64, num_steps=1)
    assert err.value.details["quota"] == "max_streams" and err.value.retry_after_s > 0
    gate.release("acme")
    gate.acquire(tenant, height=64, width=64, num_steps=1)  # a slot came back
    assert gate.live_streams("acme") == 2


def test_open_access_without_a_registry():
    gate = TenantGate(None)
    assert gate.open_access and gate.authenticate("") is ANONYMOUS
    for _ in range(10):
        gate.acquire(ANONYMOUS, height=480, width=832, num_steps=4)


def test_registry_from_file_env_and_service_config(tmp_path, registry_and_keys):
    reg, acme, _ = registry_and_keys
    import yaml

    text = yaml.safe_dump(reg.to_dict())
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    assert load_registry(path) == reg
    assert load_registry(None, {ENV_VAR: text}) == reg
    assert load_registry(None, {ENV_VAR: json.dumps(reg.to_dict())}) == reg
    assert load_registry(None, {}) is None
    assert ServiceConfig.from_dict({}, environ={ENV_VAR: text}).tenants == reg
    assert ServiceConfig.from_dict({"tenants": str(path)}, environ={}).tenants == reg
    assert ServiceConfig.from_dict({}, environ={}).tenants is None
    svc = ServiceConfig(tenants=reg)
    assert ServiceConfig.from_dict(svc.to_dict(), environ={}).tenants == reg  # round trip


@pytest.mark.parametrize("data, words", [
    ({"tenants": [{"name": "a", "tier": "gold"}]}, "tier"),
    ({"tenants": [{"name": "a", "quota": {"max_steps": 9}}]}, "max_steps"),
    ({"tenants": [{"name": "a", "keys": [{"key_id": "k1", "hash": "plaintext-key"}]}]}, "never a raw key"),
    ({"tenants": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"tenants": [{"name": "a", "colour": "red"}]}, "unknown fields"),
])
def test_bad_registries_are_value_errors_naming_the_problem(data, words):
    with pytest.raises(ValueError, match=words):
        TenantRegistry.from_dict(data)


def test_cli_prints_a_key_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    assert tenants_main(["--file", str(path), "add", "acme", "--tier", "premium", "--max-streams", "3"]) == 0
    raw = capsys.readouterr().out.strip()
    assert raw.startswith("weir_") and split_key(raw)[1] not in path.read_text()
    reg = parse_registry(path.read_text())
    assert reg.authenticate(raw).quota.max_streams == 3
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert tenants_main(["--file", str(path), "list"]) == 0
    listed = capsys.readouterr().out
    assert split_key(raw)[0] in listed and split_key(raw)[1] not in listed
    assert tenants_main(["--file", str(path), "revoke", split_key(raw)[0]]) == 0
    with pytest.raises(UnauthenticatedError):
        parse_registry(path.read_text()).authenticate(raw)


def test_a_key_never_appears_in_captured_logs(caplog, registry_and_keys):
    """Every auth path, logged at DEBUG with the errors' messages and details: the raw key is absent."""
    reg, acme, _ = registry_and_keys
    gate = TenantGate(reg.revoke(split_key(acme)[0]))
    key_id, secret = split_key(acme)
    log = logging.getLogger("weir.ingress")
    with caplog.at_level(logging.DEBUG):
        for key in (acme, f"weir_{key_id}_{secret}x", secret, ""):
            with pytest.raises(UnauthenticatedError) as err:
                gate.authenticate(key)
            status = status_of(err.value)
            log.info("stream ended with %s: %s %r", status.code.name, status.details, err.value.details,
                     exc_info=err.value)
    assert caplog.records
    assert acme not in caplog.text and secret not in caplog.text
