"""The CTR model's registry: every trained model is a version of one MLflow registered model, and
the alias ``champion`` names the version that serves (docs/registry.md).

A retrained version becomes champion unless it validates significantly worse than the champion on
the same validation rows (:meth:`Registry.gate`: DeLong's paired test, lib/metrics.py); otherwise it
keeps the alias ``challenger`` and the champion keeps serving. Promotion happens under a lock held
in the tracking database itself, so two retrains finishing together leave exactly one champion and
both versions registered.

Dagster-free: the assets reach it through ``MlflowResource``; the operators through ``mmctr-model``
(lib/ctr/registry_cli.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmctr_assets.lib.io import atomic_path
from mmctr_assets.lib.metrics import AUCComparison
from mmctr_assets.lib.redaction import redact

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_FILE, CONFIG_FILE = "model.pt", "model_config.json"
# version tags the gate, predictions and rollback read
TAG_AUC, TAG_SHA, TAG_ITEMS, TAG_PROMOTED, TAG_ROLLED_BACK = (
    "valid_auc", "model_sha256", "item_info_fingerprint", "promoted_at", "rolled_back")
# a lock older than this was left by a process that died while promoting
LOCK_STALE_S = 900.0


class RegistryUnavailable(RuntimeError):
    """The tracking server / database does not answer."""


class ChampionUnusable(RuntimeError):
    """The champion cannot score the current data (files gone, older model format, other items)."""


class ChampionFilesMissing(ChampionUnusable):
    """The champion version is registered but its model file cannot be read back."""


class PromotionRefused(ValueError):
    """An operator asked for a version that cannot serve the current data."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def quiet_transfers() -> None:
    """No tqdm bars for artifact up/downloads: step logs and the CLI are read, not watched."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def server_request(tracking_uri: str, path: str) -> tuple[urllib.request.Request, str]:
    """A GET of ``path`` on the tracking server, authenticated as MLflow's client does it:
    MLFLOW_TRACKING_USERNAME/PASSWORD, else the URI's ``user:password@``, else MLFLOW_TRACKING_TOKEN.
    The URL it requests carries no credentials (urllib cannot parse them, and errors quote it).
    -> (request, where its credentials came from, for messages)."""
    import base64

    parts = urllib.parse.urlsplit(tracking_uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + path, "", ""))
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    source = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
    if not (user and password) and parts.username is not None:
        user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
        source = "the tracking URI's user:password"
    headers = {}
    if user and password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        source = f"user {user!r} from {source}"
    elif token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
        source = "MLFLOW_TRACKING_TOKEN"
    else:
        source = "no credentials (none in the URI, MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
    return urllib.request.Request(url, headers=headers), source


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for a server or another database)."""
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def check_reachable(tracking_uri: str, timeout_s: float = 5.0, must_exist: bool = False) -> None:
    """Fail fast when the registry cannot be reached: MLflow's own HTTP retries take minutes, so a
    server gets one short authenticated request to the registry API (``/health`` answers without a
    login, so it cannot tell wrong credentials); a database gets one query. Messages are redacted.
    ``must_exist``: a sqlite file that is missing is an error (opening it would create an empty store,
    losing sight of the champion), for readers and for a writer whose model.pt came from that store."""
    fix = ("Start the tracking server (deploy/mlflow-server.sh) or point MLFLOW_TRACKING_URI / "
           "resources.mlflow.config.tracking_uri at a reachable one; nothing was trained or overwritten.")
    where = redact(tracking_uri)
    db = sqlite_path(tracking_uri)
    if must_exist and db is not None and not db.exists():
        raise RegistryUnavailable(
            f"MLflow store {db} does not exist (tracking URI {where}), so the registered model and its "
            "champion cannot be read; it was not created. Restore the file from a backup, or point "
            "MLFLOW_TRACKING_URI / resources.mlflow.config.tracking_uri at the store that holds the models. In a "
            "new deployment materialise dcn_din_model first (it creates the store); to start a new registry on "
            "purpose, move the output folder's dcn_din_model/model.pt away first. Nothing was read or written.")
    if tracking_uri.startswith(("http://", "https://")):
        request, credentials = server_request(tracking_uri, "/api/2.0/mlflow/registered-models/search?max_results=1")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as r:
                if r.status == 200:
                    return
                problem = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RegistryUnavailable(
                    f"MLflow tracking server {where} is up but refused the request as unauthorised (HTTP {e.code}) "
                    f"with {credentials}. Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                    "MLFLOW_TRACKING_TOKEN) to an account on that server; nothing was trained or overwritten."
                ) from None
            problem = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            problem = str(getattr(e, "reason", e))
        raise RegistryUnavailable(redact(f"MLflow tracking server {where} does not answer {request.full_url} "
                                         f"({problem}). {fix}")) from None
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri, registry_uri=tracking_uri).search_registered_models(max_results=1)
    except Exception as e:  # noqa: BLE001 - any store error means the same thing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "database is locked" in str(e):
            fix = ("Another process holds a write lock on this sqlite store (sqlite lets one writer in at a "
                   "time): let it finish or stop it, then run again; several concurrent writers need a tracking "
                   "server (deploy/mlflow-server.sh). Nothing was trained or overwritten.")
        raise RegistryUnavailable(redact(f"MLflow registry at {where} cannot be used ({type(e).__name__}: "
                                         f"{first[:300]}). {fix}")) from None


@dataclass(frozen=True)
class GateDecision:
    version: str
    promoted: bool
    new_auc: float
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_auc: float | None
    tolerance: float
    note: str  # one sentence for the check's description
    comparison: AUCComparison | None = None  # the paired test, when the champion's predictions were scored
    alpha: float | None = None  # its one-sided level

    def test_summary(self) -> dict[str, float]:
        """The paired test's figures for metadata and MLflow ({} without a paired test)."""
        c = self.comparison
        if c is None or self.alpha is None:
            return {}
        lo, hi = c.interval(self.alpha)
        return {"auc_diff": c.diff, "auc_diff_ci_low": lo, "auc_diff_ci_high": hi, "ci_level": 1 - 2 * self.alpha,
                "p_value_worse": c.p_worse(self.tolerance), "gate_alpha": self.alpha}

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER


class Registry:
    """One registered model in one tracking store (sqlite file or MLflow server)."""

    def __init__(self, tracking_uri: str, name: str):
        from mlflow import MlflowClient

        quiet_transfers()
        self.tracking_uri, self.name = tracking_uri, name
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)

    # ----------------------------------------------------------------------------- versions
    def _ensure_registered_model(self, name: str, **kwargs) -> bool:
        """Create ``name``; False when it already exists (the database refuses a second one)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, **kwargs)
            return True
        except MlflowException as e:
            # RESOURCE_DOES_NOT_EXIST: the insert lost to an existing row, and MLflow's own look-up
            # of that row (for its message) found it deleted meanwhile (a promotion lock released
            # between the two): not created either, the caller tries again
            if e.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise

    def register(self, model_uri: str, run_id: str, model_file: Path, tags: dict[str, str],
                 description: str = "", model_id: str | None = None) -> str:
        """A new version of the registered model for a logged model; -> its version number."""
        self._ensure_registered_model(self.name, description="mmctr CTR model (dcn_din_model); alias "
                                      f"{CHAMPION!r} serves predictions")
        tags = {k: str(v) for k, v in tags.items()} | {TAG_SHA: sha256(model_file)}
        mv = self.client.create_model_version(self.name, source=model_uri, run_id=run_id, tags=tags,
                                              description=description, model_id=model_id)
        return str(mv.version)

    def versions(self) -> list:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def version(self, version: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            known = ", ".join(str(v.version) for v in self.versions()) or "none"
            raise PromotionRefused(f"{self.name} has no version {version} (registered: {known}; "
                                   "`mmctr-model list` shows them)") from None

    def aliases(self) -> dict[str, str]:
        """alias -> version, from the registered model itself: a version search leaves ModelVersion
        .aliases empty on some stores (sqlite), this look-up fills it on every store."""
        from mlflow.exceptions import MlflowException

        try:
            return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def champion(self):
        """The champion's ModelVersion, or None when no version holds the alias yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    # -------------------------------------------------------------------------- model files
    def model_file(self, mv, cache_dir: Path, local_copy: Path | None = None) -> Path:
        """A verified local copy of ``mv``'s model.pt: ``local_copy`` when its sha256 matches the
        version's, else a download into ``cache_dir/v<N>/`` (kept for the next call)."""
        want = mv.tags.get(TAG_SHA)
        for candidate in (local_copy, cache_dir / f"v{mv.version}" / MODEL_FILE):
            if candidate is not None and candidate.exists() and sha256(candidate) == want:
                return candidate
        import mlflow

        cached = cache_dir / f"v{mv.version}" / MODEL_FILE
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".download-") as tmp:
            try:
                got = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.name}/{mv.version}/artifacts/{MODEL_FILE}",
                    dst_path=tmp, tracking_uri=self.tracking_uri))
                problem = None if sha256(got) == want else f"its sha256 differs from the registered {want}"
            except Exception as e:  # noqa: BLE001 - missing file, store error: same fix
                problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            if problem:
                raise ChampionFilesMissing(
                    f"{self.name} version {mv.version} (alias {', '.join(mv.aliases) or 'none'}, MLflow run "
                    f"{mv.run_id}) has no readable {MODEL_FILE} in the registry ({mv.source}): {problem}. Fix: "
                    f"`mmctr-model rollback` (or `mmctr-model promote VERSION` with a version whose files exist; "
                    "`mmctr-model list` shows them), or materialise dcn_din_model to train and register a new model."
                ) from None
            with atomic_path(cached) as staged:
                shutil.move(got, staged)
        return cached

    # ---------------------------------------------------------------------------- promotion
    @contextlib.contextmanager
    def promotion_lock(self, owner: str, wait_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
        """Held while one process reads the champion and moves the aliases. The lock is a registered
        model named ``<name>.promotion-lock``: the tracking database refuses a second one with the
        same name (sqlite and Postgres alike), so exactly one creator wins. A lock older than
        LOCK_STALE_S was left by a dead process and is taken over."""
        lock = f"{self.name}.promotion-lock"
        deadline = time.monotonic() + wait_s
        while not self._ensure_registered_model(lock, tags={"owner": owner, "created": f"{time.time():.3f}"}):
            with contextlib.suppress(Exception):  # gone meanwhile: just try again
                created = float(self.client.get_registered_model(lock).tags.get("created", "0"))
                if time.time() - created > LOCK_STALE_S:
                    self.client.delete_registered_model(lock)
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock} is held by another promotion for over {wait_s:.0f}s; if no "
                                   f"retrain is running, delete that registered model in MLflow")
            time.sleep(poll_s)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                if self.client.get_registered_model(lock).tags.get("owner") == owner:
                    self.client.delete_registered_model(lock)

    def _set_champion(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        self.client.set_model_version_tag(self.name, version, TAG_PROMOTED, f"{time.time():.3f}")
        if TAG_ROLLED_BACK in self.client.get_model_version(self.name, version).tags:
            self.client.delete_model_version_tag(self.name, version, TAG_ROLLED_BACK)

    def gate(self, version: str, new_auc: float, score: Callable[[object], float | AUCComparison],
             tolerance: float, owner: str, alpha: float = 0.05) -> GateDecision:
        """Promote ``version`` (validation AUC ``new_auc``) unless it is worse than the champion, which
        ``score(champion_version)`` scores now on the same validation rows; else give it the alias
        ``challenger``. ``score`` returns DeLong's paired comparison (new minus champion): the version
        is refused when the one-sided test says it is worse by more than ``tolerance`` at level
        ``alpha`` (alpha 0.5 is the point rule below). A plain champion AUC (no predictions to pair)
        falls back to ``new_auc >= champion - tolerance``. Reading the champion and moving the alias
        happen under the promotion lock, so a race cannot promote against a champion just replaced."""
        with self.promotion_lock(owner):
            champion = self.champion()
            earlier = [str(v.version) for v in self.versions() if str(v.version) != str(version)]
            if champion is None and earlier:  # the alias was removed (or its version deleted): no silent bypass
                decision = GateDecision(
                    version, False, new_auc, None, None, tolerance,
                    f"{self.name} has versions {', '.join(earlier)} but none holds the alias {CHAMPION!r}, so "
                    "there is nothing to compare with and nothing is promoted automatically; choose the version "
                    f"to serve: `mmctr-model list`, then `mmctr-model promote VERSION` (this one: "
                    f"`mmctr-model promote {version}`)")
            elif champion is None:
                decision = GateDecision(version, True, new_auc, None, None, tolerance,
                                        "first version of the registered model: promoted")
            else:
                try:
                    scored = score(champion)
                except ChampionUnusable as e:
                    decision = GateDecision(version, True, new_auc, str(champion.version), None, tolerance,
                                            f"the champion cannot be scored ({e}); the new version replaces it")
                else:
                    decision = _compare(version, new_auc, str(champion.version), scored, tolerance, alpha)
            if decision.promoted:
                self._set_champion(version)
            else:
                self.client.set_registered_model_alias(self.name, CHALLENGER, version)
            self.client.set_model_version_tag(self.name, version, "gate", decision.note)
        return decision

    def promote(self, version: str, item_fingerprint: str | None, owner: str, reason: str = "promote") -> str:
        """Operator promotion: ``version`` becomes champion, refused when it was trained on other item
        tables than ``item_fingerprint`` (the current raw_item_info). -> the previous champion."""
        target = self.version(version)
        trained_on = target.tags.get(TAG_ITEMS)
        if item_fingerprint and trained_on != item_fingerprint:
            raise PromotionRefused(
                f"{reason} to {self.name} version {version} refused: it was trained on other item tables "
                f"(raw_item_info fingerprint {trained_on} != the current {item_fingerprint}); its item ids "
                "and embeddings do not match the data predictions read. Pick a version trained on the "
                "current item_info (`mmctr-model list`), or retrain: materialise dcn_din_model.")
        with self.promotion_lock(owner):
            previous = self.champion()
            self._set_champion(str(version))
        return str(previous.version) if previous else ""

    def rollback(self, item_fingerprint: str | None, owner: str, to: str | None = None) -> tuple[str, str]:
        """Champion back to the version that served before it (or ``to``); the current champion is
        tagged rolled_back so a second rollback goes further back. -> (from, to)."""
        current = self.champion()
        if current is None:
            raise PromotionRefused(f"{self.name} has no champion to roll back from")
        if to is None:
            earlier = [v for v in self.versions() if TAG_PROMOTED in v.tags and str(v.version) != str(current.version)
                       and TAG_ROLLED_BACK not in v.tags
                       and float(v.tags[TAG_PROMOTED]) < float(current.tags.get(TAG_PROMOTED, "inf"))]
            if not earlier:
                raise PromotionRefused(f"{self.name} version {current.version} is the first champion: no "
                                       "earlier champion to roll back to (`mmctr-model promote VERSION` picks any)")
            to = max(earlier, key=lambda v: float(v.tags[TAG_PROMOTED])).version
        self.promote(to, item_fingerprint, owner, reason="rollback")
        self.client.set_model_version_tag(self.name, str(current.version), TAG_ROLLED_BACK, f"{time.time():.3f}")
        return str(current.version), str(to)


def _compare(version: str, new_auc: float, champion_version: str, scored: float | AUCComparison,
             tolerance: float, alpha: float) -> GateDecision:
    """The gate's verdict on one challenger against the champion's score (see Registry.gate)."""
    if not isinstance(scored, AUCComparison):
        champion_auc = float(scored)
        passed = new_auc >= champion_auc - tolerance
        return GateDecision(version, passed, new_auc, champion_version, champion_auc, tolerance,
                            f"valid AUC {new_auc:.6f} {'>=' if passed else '<'} champion v{champion_version}'s "
                            f"{champion_auc:.6f} - tolerance {tolerance:g} on the same validation data")
    p = scored.p_worse(tolerance)
    lo, hi = scored.interval(alpha)
    passed = not p < alpha
    verdict = ("not significantly worse: promoted" if passed else "significantly worse: refused")
    return GateDecision(
        version, passed, scored.auc_a, champion_version, scored.auc_b, tolerance,
        f"valid AUC {scored.auc_a:.6f} vs champion v{champion_version}'s {scored.auc_b:.6f} on the same "
        f"{scored.rows:,} validation rows: difference {scored.diff:+.6f}, {1 - 2 * alpha:.0%} interval "
        f"[{lo:+.6f}, {hi:+.6f}], one-sided DeLong p = {p:.4g} that it is worse by more than "
        f"{tolerance:g} (alpha {alpha:g}): {verdict}", scored, alpha)
