"""No secret in any output: the one redaction (lib/redaction.py), the tracking-server check that
authenticates as MLflow does (against a real HTTP server on loopback that wants basic auth), and the
places a URI reaches the UI: run metadata, the step's events and logs, the resource page."""

import base64
import contextlib
import json
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from mmctr_assets import resources as resources_module
from mmctr_assets.defs import ctr
from mmctr_assets.lib.ctr import registry
from mmctr_assets.lib.redaction import RedactedError, redact, redacted_errors
from mmctr_assets.resources import MlflowResource

USER, PASSWORD = "alice", "S3cretPW-x9"


@pytest.mark.parametrize("text, kept", [
    (f"http://{USER}:{PASSWORD}@127.0.0.1:5000/api", f"http://{USER}:***@127.0.0.1:5000/api"),
    (f"see postgresql+psycopg2://{USER}:{PASSWORD}@db:5432/mlflow?sslmode=require now",
     f"see postgresql+psycopg2://{USER}:***@db:5432/mlflow?sslmode=require now"),
    (f"'https://{USER}:{PASSWORD}@a@host/x' and http://host:5000/ok", "'https://alice:***@host/x' and http://host:5000/ok"),
    (f"host=db user=u password={PASSWORD} dbname=x", "host=db user=u password=*** dbname=x"),
    ("http://host:5000/#/experiments/1", "http://host:5000/#/experiments/1"),
])
def test_redact_masks_passwords_and_keeps_who_and_where(text, kept):
    assert redact(text) == kept


def test_redact_masks_secret_variables_and_uri_passwords_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tok-123456")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:p%40ss-word@mlflow:5000")
    said = redact("401 for tok-123456; the library decoded p@ss-word; quoted p%40ss-word")
    assert "tok-123456" not in said and "p@ss-word" not in said and "p%40ss-word" not in said


def test_redacted_errors_replace_only_errors_that_quote_a_secret():
    with pytest.raises(RedactedError) as e, redacted_errors():
        raise ConnectionError(f"API request to http://{USER}:{PASSWORD}@h:1/api failed")
    assert PASSWORD not in str(e.value) and e.value.__suppress_context__ and "ConnectionError" in str(e.value)
    with pytest.raises(KeyError), redacted_errors():  # anything else keeps its type
        raise KeyError("plain")


# --------------------------------------------------------------------------- the tracking server
@contextlib.contextmanager
def basic_auth_server():
    """A server on 127.0.0.1 (OS-assigned port) that answers 200 only with alice's password, like an
    authenticating proxy in front of MLflow; yields (host:port, requests seen)."""
    seen: list[tuple[str, str | None]] = []
    good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == good
            body = json.dumps({} if ok else {"error": "unauthorised"}).encode()
            self.send_response(200 if ok else 401)
            if not ok:
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_mlflow_credentials(monkeypatch):
    for name in ("USERNAME", "PASSWORD", "TOKEN", "URI"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)


def test_server_that_is_up_is_reported_up_with_the_uris_credentials(no_mlflow_credentials):
    with basic_auth_server() as (host, seen):
        registry.check_reachable(f"http://{USER}:{PASSWORD}@{host}")
    (path, auth), = seen
    assert path.startswith("/api/2.0/mlflow/") and auth.startswith("Basic ")  # an API call: /health needs no login


def test_server_that_is_up_is_reported_up_with_mlflows_variables(no_mlflow_credentials, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with basic_auth_server() as (host, _):
        registry.check_reachable(f"http://{host}/")


@pytest.mark.parametrize("credentials", [f"{USER}:wrong-{PASSWORD}@", ""])
def test_wrong_or_missing_credentials_say_unauthorised_without_the_password(credentials, no_mlflow_credentials):
    with basic_auth_server() as (host, _), pytest.raises(registry.RegistryUnavailable) as e:
        registry.check_reachable(f"http://{credentials}{host}")
    message = str(e.value)
    assert "unauthorised (HTTP 401)" in message and "MLFLOW_TRACKING_USERNAME" in message
    assert PASSWORD not in message and host in message


def test_mmctr_model_says_unauthorised_without_the_password(no_mlflow_credentials, tmp_path, capsys):
    from mmctr_assets.lib.ctr import registry_cli

    with basic_auth_server() as (host, _):
        code = registry_cli.main(["--tracking-uri", f"http://{USER}:wrong-{PASSWORD}@{host}",
                                  "--output-dir", str(tmp_path), "list"])
    said = capsys.readouterr()
    assert code == 2 and "unauthorised" in said.err and PASSWORD not in said.out + said.err


def test_a_refused_run_stores_no_password_in_events_logs_or_output(no_mlflow_credentials, tmp_path, capfd,
                                                                   make_resources, tiny_data):
    """dcn_din_model checks the registry first: with the wrong password it stops there, and neither
    the event log (what the UI shows), nor the console, nor any output holds the password."""
    with basic_auth_server() as (host, _), dg.instance_for_test() as instance:
        resources = make_resources(tiny_data, tmp_path / "outputs") | {
            "mlflow": MlflowResource(tracking_uri=f"http://{USER}:wrong-{PASSWORD}@{host}")}
        result = dg.materialize([ctr.dcn_din_model], resources=resources, instance=instance, raise_on_error=False)
        assert not result.success
        events = [serialize_value(e) for e in instance.all_logs(result.run_id)]  # the rows the UI reads
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "unauthorised (HTTP 401)" in str(failure.event_specific_data.error.to_string())
    captured = capfd.readouterr()
    assert any("unauthorised (HTTP 401)" in e for e in events)  # the error's text is in these rows
    assert not [e for e in events if PASSWORD in e] and PASSWORD not in captured.out + captured.err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]


def test_run_url_metadata_carries_no_credentials():
    run = types.SimpleNamespace(info=types.SimpleNamespace(experiment_id="3", run_id="abc"))
    for uri in (f"http://{USER}:{PASSWORD}@mlflow:5000", f"postgresql://{USER}:{PASSWORD}@db/mlflow"):
        url = MlflowResource(tracking_uri=uri).run_url(run)
        assert PASSWORD not in url and "#/experiments/3/runs/abc" in url and USER in url


def test_the_resource_page_shows_the_variable_not_the_uri(monkeypatch):
    """The UI's resource page shows each resource's configured values (ResourceSnap reads them from
    the config schema's default): a tracking URI from the environment appears as its variable."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{PASSWORD}@mlflow:5000")
    defs = dg.Definitions(resources=resources_module.default_resources())
    shown = defs.get_repository_def().get_top_level_resources()["mlflow"].config_schema.default_value_as_json_str
    assert PASSWORD not in shown and "MLFLOW_TRACKING_URI" in shown
