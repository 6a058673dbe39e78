"""Tenants: API keys stored only as salted scrypt hashes, revocation, quotas and a bounded tier.

The registry is plain data, parsed once at the edge (`load_registry`: a YAML/JSON file, or the file's
content in the `WEIR_TENANTS` environment variable, e.g. a Kubernetes secret) and carried to the ingress
inside ServiceConfig. It never holds a raw key. The file, as `weir tenants add` writes it:

    tenants:
    - name: acme
      tier: premium                                   # free | standard | premium (a metrics label)
      quota: {max_streams: 4, max_pixels: 399360, max_steps: 4}
      keys:
      - {key_id: 3f9a1c2e, hash: "scrypt$16384$8$1$<salt b64>$<digest b64>", revoked: false}

A key reads `weir_<key_id>_<secret>`. The key id is not secret: it picks the record to check, so one
scrypt runs per call (an unknown id is checked against a dummy hash, so it costs the same). The digest
is compared with hmac.compare_digest. A missing, malformed, unknown, wrong or revoked key raises
UnauthenticatedError whose message never contains the key.

`TenantGate` is the live check an ingress replica runs on every stream open: authenticate, then the
per-stream quotas (max pixels per frame, max denoising steps); `StreamQuota` counts the concurrent
streams of each tenant at the Router deployment, so that quota holds across all ingress replicas. Both
raise AdmissionRefusedError (RESOURCE_EXHAUSTED) whose message and `quota` detail name the quota. Worked example: acme's quota max_pixels 399360 (480x832); a 720x1280 stream (921600 pixels) is
refused with "quota max_pixels=399360 ...", whatever its key.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from stages.errors import AdmissionRefusedError, UnauthenticatedError

TIERS = ("free", "standard", "premium")
"""Tenant tiers: the only values the `tier` metrics label takes."""
ENV_VAR = "WEIR_TENANTS"
"""Environment variable holding the registry file's content (a mounted secret)."""
KEY_PREFIX = "weir"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
"""scrypt cost of new hashes (~16 MiB, ~60 ms per check on one core); stored with each hash."""
QUOTA_RETRY_AFTER_S = 5.0
"""Retry hint of a concurrent-streams refusal (a stream of the tenant may end by then)."""


# ---- hashing ---------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
                p: int = SCRYPT_P) -> str:
    """`scrypt$n$r$p$salt$digest` (base64url) of a key's secret part, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """True when `secret` hashes to `stored` (constant-time compare); False for a malformed `stored`."""
    try:
        algo, n, r, p, salt, digest = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=32)
        return hmac.compare_digest(got, _unb64(digest))
    except (ValueError, TypeError):
        return False


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
"""Checked for unknown key ids, so an unknown id takes as long as a wrong secret."""


def split_key(api_key: str) -> tuple[str, str] | None:
    """(key_id, secret) of `weir_<key_id>_<secret>`, or None when the key is not of that form."""
    parts = api_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def new_key() -> tuple[str, str]:
    """(key_id, raw key): 8 hex characters of id and 256 bits of secret."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


# ---- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """What one tenant may use."""

    max_streams: int = 4
    """Concurrent open streams, 1..4096."""
    max_pixels: int = 480 * 832
    """Largest height * width of a stream's frames, >= 256 (16x16). 480x832 = 399360."""
    max_steps: int = 4
    """Most denoising steps a stream may ask for, 1..4."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_streams <= 4096:
            raise ValueError(f"quota max_streams={self.max_streams} must be in 1..4096")
        if self.max_pixels < 256:
            raise ValueError(f"quota max_pixels={self.max_pixels} must be >= 256 (16x16)")
        if not 1 <= self.max_steps <= 4:
            raise ValueError(f"quota max_steps={self.max_steps} must be in 1..4")


UNLIMITED = Quota(max_streams=4096, max_pixels=2048 * 2048, max_steps=4)
"""The quota of open access (no registry configured)."""


@dataclass(frozen=True)
class KeyRecord:
    """One API key, as stored: its public id and the hash of its secret."""

    key_id: str
    hash: str
    """`scrypt$n$r$p$salt$digest`, see hash_secret."""
    revoked: bool = False

    def __post_init__(self) -> None:
        if not self.key_id or "_" in self.key_id:
            raise ValueError(f"key_id={self.key_id!r} must be non-empty without '_'")
        if not self.hash.startswith("scrypt$") or self.hash.count("$") != 5:
            raise ValueError(f"key {self.key_id}: hash must be 'scrypt$n$r$p$salt$digest' (never a raw key)")


@dataclass(frozen=True)
class Tenant:
    """A customer: name (never a metrics label), tier (a bounded label), quota, keys."""

    name: str
    tier: str = "standard"
    quota: Quota = field(default_factory=Quota)
    keys: tuple[KeyRecord, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tenant name must be non-empty")
        if self.tier not in TIERS:
            raise ValueError(f"tenant {self.name!r}: tier={self.tier!r}; choose one of {TIERS}")


ANONYMOUS = Tenant("anonymous", "standard", UNLIMITED)
"""Every stream's tenant under open access."""


@dataclass(frozen=True)
class TenantRegistry:
    """Tenants and their hashed keys. Immutable: `add_key` / `revoke` return a new registry."""

    tenants: tuple[Tenant, ...] = ()

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique, got {sorted(names)}")
        ids = [k.key_id for t in self.tenants for k in t.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique across tenants")

    # -- lookups ------------------------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(f"no tenant {name!r}; tenants: {[t.name for t in self.tenants]}")

    def authenticate(self, api_key: str) -> Tenant:
        """The tenant owning a valid, unrevoked key; UnauthenticatedError (without the key) otherwise."""
        if not api_key:
            raise UnauthenticatedError("missing API key: send StreamOpen.api_key")
        parts = split_key(api_key)
        if parts is None:
            raise UnauthenticatedError("malformed API key (expected weir_<id>_<secret>)")
        key_id, secret = parts
        found = next(((t, k) for t in self.tenants for k in t.keys if k.key_id == key_id), None)
        ok = verify_secret(secret, found[1].hash if found else _DUMMY_HASH)
        if found is None or not ok:
            raise UnauthenticatedError("unknown API key")
        tenant, record = found
        if record.revoked:
            raise UnauthenticatedError(f"API key {record.key_id} was revoked", key_id=record.key_id)
        return tenant

    # -- edits (the `weir tenants` helper) -----------------------------------------------------------

    def add_key(self, name: str, *, tier: str | None = None, quota: Quota | None = None) -> tuple[TenantRegistry, str]:
        """Add a key to tenant `name` (created when new); returns (new registry, the raw key, shown once)."""
        key_id, raw = new_key()
        while any(k.key_id == key_id for t in self.tenants for k in t.keys):
            key_id, raw = new_key()
        record = KeyRecord(key_id, hash_secret(split_key(raw)[1]))
        tenants = list(self.tenants)
        for i, t in enumerate(tenants):
            if t.name == name:
                tenants[i] = replace(t, tier=tier or t.tier, quota=quota or t.quota, keys=(*t.keys, record))
                break
        else:
            tenants.append(Tenant(name, tier or "standard", quota or Quota(), (record,)))
        return TenantRegistry(tuple(tenants)), raw

    def revoke(self, key_id: str) -> TenantRegistry:
        """Mark a key revoked (kept, so the id is never reused). Raises KeyError for an unknown id."""
        if not any(k.key_id == key_id for t in self.tenants for k in t.keys):
            raise KeyError(f"no key with id {key_id!r}")
        return TenantRegistry(tuple(
            replace(t, keys=tuple(replace(k, revoked=True) if k.key_id == key_id else k for k in t.keys))
            for t in self.tenants
        ))

    # -- (de)serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"tenants": [asdict(t) for t in self.tenants]}

    @classmethod
    def from_dict(cls, data: Mapping) -> TenantRegistry:
        """From the file format (module docstring); ValueError naming what is wrong."""
        if not isinstance(data, Mapping) or set(data) - {"tenants"}:
            raise ValueError("a tenant registry is a mapping with one key, 'tenants'")
        tenants = []
        for row in data.get("tenants") or ():
            row = dict(row)
            unknown = set(row) - {"name", "tier", "quota", "keys"}
            if unknown:
                raise ValueError(f"tenant {row.get('name')!r}: unknown fields {sorted(unknown)}")
            try:
                quota = Quota(**(row.get("quota") or {}))
                keys = tuple(KeyRecord(**k) for k in row.get("keys") or ())
            except TypeError as exc:
                raise ValueError(f"tenant {row.get('name')!r}: {exc}") from None
            tenants.append(Tenant(str(row.get("name", "")), str(row.get("tier", "standard")), quota, keys))
        return cls(tuple(tenants))


def parse_registry(text: str) -> TenantRegistry:
    """A registry from YAML or JSON text (JSON is YAML)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"tenant registry is not valid YAML/JSON: {exc}") from None
    return TenantRegistry.from_dict(data or {"tenants": []})


def load_registry(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> TenantRegistry | None:
    """The edge: the file at `path`, else the content of $WEIR_TENANTS, else None (open access)."""
    if path:
        return parse_registry(Path(path).read_text())
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR, "")
    return parse_registry(text) if text.strip() else None


def save_registry(registry: TenantRegistry, path: str | os.PathLike) -> None:
    """Write the registry (hashes only) with owner-only permissions."""
    import yaml

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(registry.to_dict(), sort_keys=False))
    os.chmod(tmp, 0o600)
    tmp.replace(p)


# ---- the live check ------------------------------------------------------------------------------------------


class TenantGate:
    """Authentication and the per-stream quotas at stream open, for one ingress replica.

    `check` is stateless (max pixels per frame, max denoising steps) and is what the ingress runs; the
    concurrent-streams quota must hold across all ingress replicas, so the Router deployment (one logical
    owner) counts it with a `StreamQuota`. `acquire` / `release` also count concurrent streams here, for a
    single process that is its own owner.
    """

    def __init__(self, registry: TenantRegistry | None) -> None:
        self.registry = registry
        self._streams = StreamQuota(registry)
        self._next = 0

    @property
    def open_access(self) -> bool:
        return self.registry is None

    def authenticate(self, api_key: str) -> Tenant:
        """The caller's tenant (ANONYMOUS under open access); UnauthenticatedError otherwise."""
        if self.registry is None:
            return ANONYMOUS
        return self.registry.authenticate(api_key)

    def check(self, tenant: Tenant, *, height: int, width: int, num_steps: int) -> None:
        """The quotas one stream's shape must meet; AdmissionRefusedError naming the quota."""
        q = tenant.quota
        if height * width > q.max_pixels:
            raise AdmissionRefusedError(
                f"quota max_pixels={q.max_pixels} of tenant tier {tenant.tier}: {height}x{width} = "
                f"{height * width} pixels; lower the resolution", retry_after_s=QUOTA_RETRY_AFTER_S,
                quota="max_pixels", limit=q.max_pixels, asked=height * width)
        if num_steps > q.max_steps:
            raise AdmissionRefusedError(
                f"quota max_steps={q.max_steps} of tenant tier {tenant.tier}: asked {num_steps} steps",
                retry_after_s=QUOTA_RETRY_AFTER_S, quota="max_steps", limit=q.max_steps, asked=num_steps)

    def acquire(self, tenant: Tenant, *, height: int, width: int, num_steps: int) -> None:
        """`check`, then count one more concurrent stream of the tenant in this process."""
        self.check(tenant, height=height, width=width, num_steps=num_steps)
        self._next += 1
        self._streams.acquire(tenant.name, f"local-{self._next}")

    def release(self, tenant_name: str) -> None:
        """One stream of the tenant ended (idempotent at zero)."""
        self._streams.release_one(tenant_name)

    def live_streams(self, tenant_name: str) -> int:
        return self._streams.live_streams(tenant_name)


class StreamQuota:
    """The concurrent-streams quota (Quota.max_streams), counted by stream id at one logical owner (the
    Router deployment: every stream open of every ingress replica passes through it).

    Example: tenant "small" with max_streams 1 holds stream "a"; acquire("small", "b") raises
    AdmissionRefusedError naming "quota max_streams=1"; release("a") frees the slot; releasing an
    unknown id does nothing.
    """

    def __init__(self, registry: TenantRegistry | None) -> None:
        self.registry = registry
        self._tenant_of: dict[str, str] = {}
        """stream id -> tenant name of every counted stream."""
        self._live: dict[str, int] = {}

    def quota_of(self, tenant_name: str) -> tuple[Quota, str]:
        """(quota, tier) of a tenant; unlimited for open access and for names the registry lacks
        (the ingress authenticated them against its own copy of the registry)."""
        if self.registry is None:
            return UNLIMITED, ANONYMOUS.tier
        try:
            tenant = self.registry.tenant(tenant_name)
        except KeyError:
            return UNLIMITED, ANONYMOUS.tier
        return tenant.quota, tenant.tier

    def acquire(self, tenant_name: str, stream_id: str) -> None:
        """Count `stream_id` for the tenant, or raise AdmissionRefusedError (quota "max_streams")."""
        if stream_id in self._tenant_of:
            return
        quota, tier = self.quota_of(tenant_name)
        live = self._live.get(tenant_name, 0)
        if live >= quota.max_streams:
            raise AdmissionRefusedError(
                f"quota max_streams={quota.max_streams} of tenant tier {tier}: {live} streams already "
                f"open; close one or retry later", retry_after_s=QUOTA_RETRY_AFTER_S,
                quota="max_streams", limit=quota.max_streams, asked=live + 1)
        self._tenant_of[stream_id] = tenant_name
        self._live[tenant_name] = live + 1

    def adopt(self, tenant_name: str, stream_id: str) -> None:
        """Count a stream that is already open (a restarted router re-learning it), even past the
        tenant's quota: it runs, so it counts; the tenant's next open is refused until it ends."""
        if stream_id in self._tenant_of:
            return
        self._tenant_of[stream_id] = tenant_name
        self._live[tenant_name] = self._live.get(tenant_name, 0) + 1

    def release(self, stream_id: str) -> None:
        """The stream ended or never opened; unknown ids are ignored."""
        tenant_name = self._tenant_of.pop(stream_id, None)
        if tenant_name is not None:
            self._decrement(tenant_name)

    def release_one(self, tenant_name: str) -> None:
        """Release any one counted stream of the tenant (callers that count streams, not ids)."""
        stream_id = next((sid for sid, t in self._tenant_of.items() if t == tenant_name), None)
        if stream_id is not None:
            self.release(stream_id)

    def _decrement(self, tenant_name: str) -> None:
        n = self._live.get(tenant_name, 0) - 1
        if n > 0:
            self._live[tenant_name] = n
        else:
            self._live.pop(tenant_name, None)

    def live_streams(self, tenant_name: str) -> int:
        return self._live.get(tenant_name, 0)


# ---- `weir tenants add | revoke | list` -------------------------------------------------------------------


def tenants_main(argv: list[str] | None = None) -> int:
    """`weir tenants ...`: edit a registry file. `add` prints the new key ONCE; only its hash is stored."""
    parser = argparse.ArgumentParser(prog="weir tenants", description="Manage Weir tenants and API keys.")
    parser.add_argument("--file", default=os.environ.get("WEIR_TENANTS_FILE", "tenants.yaml"),
                        help="registry file (default: $WEIR_TENANTS_FILE or tenants.yaml)")
    sub = parser.add_subparsers(dest="op", required=True)
    p = sub.add_parser("add", help="add a key to a tenant (creating the tenant); prints the key once")
    p.add_argument("name")
    p.add_argument("--tier", choices=TIERS, default=None)
    p.add_argument("--max-streams", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p = sub.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id")
    sub.add_parser("list", help="tenants, tiers, quotas and key ids (never keys)")
    args = parser.parse_args(argv)

    path = Path(args.file)
    registry = parse_registry(path.read_text()) if path.exists() else TenantRegistry()
    if args.op == "add":
        try:
            base = registry.tenant(args.name).quota
        except KeyError:
            base = Quota()
        overrides = {k: v for k, v in (("max_streams", args.max_streams), ("max_pixels", args.max_pixels),
                                       ("max_steps", args.max_steps)) if v is not None}
        registry, raw = registry.add_key(args.name, tier=args.tier, quota=replace(base, **overrides))
        save_registry(registry, path)
        print(raw)
        sys.stderr.write(f"added a key for tenant {args.name!r} to {path}; the key above is shown only once\n")
    elif args.op == "revoke":
        try:
            registry = registry.revoke(args.key_id)
        except KeyError as exc:
            sys.stderr.write(f"{exc.args[0]}\n")
            return 2
        save_registry(registry, path)
        print(f"revoked {args.key_id}")
    else:
        rows = [{"tenant": t.name, "tier": t.tier, **asdict(t.quota),
                 "keys": [k.key_id + (" (revoked)" if k.revoked else "") for k in t.keys]} for t in registry.tenants]
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(tenants_main())
