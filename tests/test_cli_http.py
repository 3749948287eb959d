"""The `proctor` commands that talk to the API (`proctor/commands.py`), run in-process
against the real Serve app (the `api` fixture), and once as the installed program."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from apiserver import spec, wait_final
from ports import free_port
from proctor.cli import EXIT_BAD_INPUT, EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, main

pytestmark = pytest.mark.ray

TAG = uuid.uuid4().hex[:6]
PROCTOR = Path(sys.executable).parent / "proctor"


@pytest.fixture(scope="module")
def cli(api: Any):  # noqa: ANN201 - Callable[..., int]
    """`proctor ARGS --url URL --token <user's key>`, in this process; returns the exit code."""
    url, tokens = str(api[0].base_url), api[1]

    def run(*args: str, user: str = "rita") -> int:
        return main([*args, "--url", url, "--token", tokens[user]])

    return run


def write_spec(folder: Path, name: str, **extra: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(spec(name, samples=1), labels={"suite": f"cli-{TAG}"}, **extra)))
    return path


def slow_spec(folder: Path, name: str, timeout_s: int = 300) -> Path:
    path = folder / f"{name}.yaml"
    data = spec(name, samples=1, timeout_s=timeout_s,
                files={"policy.py": "import time\ndef answer(messages, **kw):\n    time.sleep(300)\n"})
    data["model"] = {"adapter": "python", "callable": "policy:answer"}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def submitted(cli: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two of rita's evaluations, submitted with `--json` and followed to the end, as JSON."""
    folder = tmp_path_factory.mktemp("cli-specs")
    paths = [write_spec(folder, f"cli-{TAG}-a"), write_spec(folder, f"cli-{TAG}-b")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli("submit", *map(str, paths), "--follow", "--json")
    assert code == EXIT_OK, out.getvalue()
    finals = json.loads(out.getvalue())
    return {ev["name"]: ev for ev in finals}


def test_submit_follow_json(submitted: dict[str, Any]) -> None:
    assert set(submitted) == {f"cli-{TAG}-a", f"cli-{TAG}-b"}
    for ev in submitted.values():
        assert ev["status"] == "succeeded" and ev["owner"] == "rita"
        assert ev["summary"]["metrics"]["exact"]["mean"] == 1.0 and ev["results_uri"]


def test_submit_wait_prints_the_summary(cli: Any, tmp_path: Path, capsys: Any) -> None:
    path = write_spec(tmp_path, f"cli-{TAG}-wait")
    assert cli("submit", str(path), "--wait") == EXIT_OK
    out = capsys.readouterr().out
    assert f"cli-{TAG}-wait" in out and "succeeded" in out
    assert "95% CI" in out and "exact" in out and "1.000" in out and "results: " in out


def test_submit_without_waiting_then_status(cli: Any, tmp_path: Path, capsys: Any, api: Any) -> None:
    path = write_spec(tmp_path, f"cli-{TAG}-queued")
    assert cli("submit", str(path), "--json") == EXIT_OK
    (queued,) = json.loads(capsys.readouterr().out)
    assert queued["status"] == "queued" and queued["spec"] == str(path)
    wait_final(api[0], api[1]["rita"], queued["id"])
    assert cli("status", queued["id"], "--json", user="vera") == EXIT_OK
    ev = json.loads(capsys.readouterr().out)
    assert ev["id"] == queued["id"] and ev["status"] == "succeeded"
    assert cli("status", queued["id"]) == EXIT_OK
    out = capsys.readouterr().out
    assert queued["id"] in out and "succeeded" in out and "95% CI" in out
    assert cli("submit", str(path)) == EXIT_OK
    line = capsys.readouterr().out.split()
    assert line[1:] == ["queued", str(path)] and line[0].startswith("ev-")
    wait_final(api[0], api[1]["rita"], line[0])


def test_failed_evaluation_exits_1(cli: Any, tmp_path: Path, capsys: Any) -> None:
    path = slow_spec(tmp_path, f"cli-{TAG}-fails", timeout_s=3)  # the sandbox's deadline fails its shard
    code = cli("submit", str(path), "--wait")
    out = capsys.readouterr().out
    assert code == EXIT_FAILED, out
    assert f"cli-{TAG}-fails" in out and "failed" in out and "deadline" in out


def test_invalid_spec_exits_2_naming_every_field(cli: Any, tmp_path: Path, capsys: Any) -> None:
    bad = spec(memroy="1Gi")
    bad["epochs"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli("submit", str(path), "--wait") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "sandbox.memroy" in err and "epochs" in err


def test_refusals_and_an_unreachable_api_have_their_exit_codes(cli: Any, tmp_path: Path, capsys: Any,
                                                               api: Any) -> None:
    path = write_spec(tmp_path, f"cli-{TAG}-denied")
    assert cli("submit", str(path), user="vera") == EXIT_DENIED
    assert "researcher role" in capsys.readouterr().err
    assert main(["list", "--url", str(api[0].base_url), "--token", "pk_bogus"]) == EXIT_DENIED
    assert "unknown, revoked or expired" in capsys.readouterr().err
    assert main(["list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x"]) == EXIT_UNAVAILABLE
    assert "proctor up" in capsys.readouterr().err
    assert cli("status", "ev-does-not-exist") == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_url_and_token_default_to_the_local_platform(api: Any, tmp_path: Path, capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCTOR_API_PORT", str(api[0].base_url.port))
    monkeypatch.setenv("PROCTOR_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("PROCTOR_TOKEN", raising=False)
    assert main(["token", "list"]) == EXIT_DENIED  # no token anywhere
    assert "PROCTOR_TOKEN" in capsys.readouterr().err
    (tmp_path / "token").write_text(api[1]["ada"] + "\n")
    assert main(["token", "list", "--json"]) == EXIT_OK
    assert {"ada", "vera"} <= {t["user"] for t in json.loads(capsys.readouterr().out)}


def test_list(cli: Any, submitted: dict[str, Any], capsys: Any) -> None:
    ids = sorted(ev["id"] for ev in submitted.values())
    assert cli("list", "--label", f"suite=cli-{TAG}", "--text", f"cli-{TAG}-", "--status", "succeeded",
               "--json", user="ada") == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert set(ids) <= {ev["id"] for ev in listed} and {ev["status"] for ev in listed} == {"succeeded"}
    assert cli("list", "--text", f"cli-{TAG}-", "--limit", "1", "--json") == EXIT_OK
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert cli("list", "--text", f"cli-{TAG}-a", "--sort", "name") == EXIT_OK
    out = capsys.readouterr().out
    assert submitted[f"cli-{TAG}-a"]["id"] in out and f"cli-{TAG}-a" in out and "succeeded" in out
    assert cli("list", "--owner", "rita", "--text", f"cli-{TAG}-", "--json", user="rob") == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


def test_logs(cli: Any, submitted: dict[str, Any], capsys: Any) -> None:
    eval_id = submitted[f"cli-{TAG}-a"]["id"]
    assert cli("logs", eval_id, "--json") == EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all({"ts", "level", "message"} <= set(line) for line in lines)
    assert cli("logs", eval_id, "-f", "--level", "error", "--grep", "no such text", "--json") == EXIT_OK
    assert capsys.readouterr().out == ""
    assert cli("logs", eval_id) == EXIT_OK
    assert len(capsys.readouterr().out.splitlines()) == len(lines)


def test_results_in_every_format(cli: Any, submitted: dict[str, Any], capsys: Any, tmp_path: Path) -> None:
    eval_id = submitted[f"cli-{TAG}-a"]["id"]
    assert cli("results", eval_id, "--json") == EXIT_OK
    (row,) = json.loads(capsys.readouterr().out)
    assert row["sample_id"] == "0" and row["score"] == 1.0 and row["scores"] == {"exact": 1.0}
    assert cli("results", eval_id, "--format", "csv") == EXIT_OK
    header, first = capsys.readouterr().out.splitlines()
    assert header.split(",")[:3] == ["schema_version", "shard_id", "sample_id"] and ',"{""exact"": 1.0}",' in first
    assert cli("results", eval_id, "--format", "parquet", "-o", str(tmp_path / "r.parquet")) == EXIT_OK
    assert pq.read_table(tmp_path / "r.parquet")["sample_id"].to_pylist() == ["0"]
    assert cli("results", eval_id, "--format", "json", "-o", str(tmp_path / "r.json")) == EXIT_OK
    assert json.loads((tmp_path / "r.json").read_text())[0]["target"] == "0"
    assert cli("results", eval_id) == EXIT_OK
    out = capsys.readouterr().out
    assert "sample_id" in out and "1.000" in out and "1 rows" in out


def test_results_as_parquet_on_stdout_of_the_installed_program(api: Any, submitted: dict[str, Any]) -> None:
    eval_id = submitted[f"cli-{TAG}-b"]["id"]
    done = subprocess.run([str(PROCTOR), "results", eval_id, "--format", "parquet", "--url", str(api[0].base_url),
                           "--token", api[1]["sam"]], capture_output=True, timeout=120)
    assert done.returncode == EXIT_OK, done.stderr.decode()
    assert pq.read_table(io.BytesIO(done.stdout))["sample_id"].to_pylist() == ["0"]


def test_results_into_a_pipe_that_closes_end_quietly(api: Any, tmp_path: Path) -> None:
    """`proctor results ... --format csv | head -1`, as the README's users run it: head
    leaves after a line; proctor stops without a traceback, as Unix tools do."""
    body = spec(f"cli-{TAG}-pipe", samples=1500)
    body["shard_size"] = 1500
    created = api[0].post("/api/v1/evaluations", json=body, headers={"Authorization": f"Bearer {api[1]['rita']}"})
    eval_id = created.json()["id"]
    assert wait_final(api[0], api[1]["rita"], eval_id, timeout=300)["status"] == "succeeded"
    command = (f"set -o pipefail; {PROCTOR} results {eval_id} --format csv --url {api[0].base_url} "
               f"--token {api[1]['rita']} | head -1")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("schema_version,shard_id,sample_id,")  # the rows are far more than a pipe holds
    assert done.stderr == "", done.stderr
    assert done.returncode == 128 + 13  # pipefail: proctor's status, as if SIGPIPE had ended it


def test_results_of_an_evaluation_made_by_proctor_run(api: Any, tmp_path: Path, capsys: Any, sandbox_root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`proctor run` writes to the local results root and the platform never hears of it:
    `proctor results` finds it there, whether the API answers 404 or is not running."""
    path = write_spec(tmp_path, f"cli-{TAG}-local")
    home = sandbox_root / f"cli-local-{TAG}"  # the sandbox user reaches its workspace there
    monkeypatch.setenv("PROCTOR_HOME", str(home))
    monkeypatch.setenv("PROCTOR_RESULTS_URI", (tmp_path / "local-results").as_uri())
    assert main(["run", str(path), "--json"]) == EXIT_OK
    (ran,) = json.loads(capsys.readouterr().out)
    eval_id = ran["eval_id"]
    url, token = str(api[0].base_url), api[1]["rita"]
    assert main(["status", eval_id, "--url", url, "--token", token]) == EXIT_BAD_INPUT  # the platform: no such id
    capsys.readouterr()
    assert main(["results", eval_id, "--format", "csv", "--url", url, "--token", token]) == EXIT_OK
    out, err = capsys.readouterr()
    header, row = out.splitlines()
    assert header.startswith("schema_version,shard_id,sample_id") and ",0," in row
    assert "local results root" in err and "proctor run" in err
    down = f"http://127.0.0.1:{free_port()}"
    assert main(["results", eval_id, "--json", "--url", down, "--token", token]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["attempt"] == 1
    assert main(["results", "ev-nowhere", "--url", url, "--token", token]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_stop_cancel_and_emergency(cli: Any, tmp_path: Path, capsys: Any, api: Any) -> None:
    cancel = slow_spec(tmp_path, f"cli-{TAG}-cancel")
    emergency = slow_spec(tmp_path, f"cli-{TAG}-emergency")
    assert cli("submit", str(cancel), str(emergency), "--json") == EXIT_OK
    first, second = (e["id"] for e in json.loads(capsys.readouterr().out))
    assert cli("stop", first) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"{first} cancelled (status ")
    assert cli("stop", second, user="vera") == EXIT_DENIED
    assert cli("stop", second, "--emergency", "--json", user="sam") == EXIT_OK
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["id"] == second and stopped["stopped"] is True
    for eval_id in (first, second):
        assert wait_final(api[0], api[1]["rita"], eval_id)["status"] == "cancelled"
        assert cli("status", eval_id) == EXIT_FAILED  # the exit codes: 1 for a cancelled evaluation
        assert "cancelled" in capsys.readouterr().out
        assert cli("status", eval_id, "--json") == EXIT_FAILED
        assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert cli("stop", second) == EXIT_OK
    assert capsys.readouterr().out == f"{second} had already ended (status cancelled)\n"
    assert cli("stop") == EXIT_BAD_INPUT
    assert "give an evaluation ID, or --all" in capsys.readouterr().err


def test_stop_all(cli: Any, tmp_path: Path, capsys: Any, api: Any) -> None:
    assert cli("submit", str(slow_spec(tmp_path, f"cli-{TAG}-all")), "--json") == EXIT_OK
    (queued,) = json.loads(capsys.readouterr().out)
    assert cli("stop", "--all", user="sam") == EXIT_DENIED
    assert cli("stop", "--all", "--json", user="ada") == EXIT_OK
    assert queued["id"] in json.loads(capsys.readouterr().out)["stopped"]
    assert wait_final(api[0], api[1]["rita"], queued["id"])["status"] == "cancelled"


def test_tokens(cli: Any, api: Any, capsys: Any) -> None:
    user = f"tom-{TAG}"
    assert cli("token", "create", user, "--role", "researcher", "--name", "cli test", "--expires-in-days", "2",
               "--json", user="ada") == EXIT_OK
    made = json.loads(capsys.readouterr().out)
    assert made["user"] == user and made["role"] == "researcher" and made["token"] and made["expires_at"]
    assert main(["list", "--json", "--url", str(api[0].base_url), "--token", made["token"]]) == EXIT_OK
    capsys.readouterr()
    assert cli("token", "list", "--json", user="ada") == EXIT_OK
    listed = {t["id"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed[made["id"]]["name"] == "cli test" and listed[made["id"]]["revoked"] is False
    assert cli("token", "list", user="ada") == EXIT_OK
    assert user in capsys.readouterr().out
    assert cli("token", "revoke", str(made["id"]), user="ada") == EXIT_OK
    assert capsys.readouterr().out.strip() == f"token {made['id']} revoked"
    assert main(["list", "--url", str(api[0].base_url), "--token", made["token"]]) == EXIT_DENIED
    assert cli("token", "create", "x", "--role", "admin") == EXIT_DENIED
    assert cli("token", "create", user, "--role", "admin", user="ada") == EXIT_BAD_INPUT  # 409: tom is a researcher
    assert cli("token", "create", f"new-{TAG}", "--role", "viewer", user="ada") == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("token ") and f"new-{TAG} (viewer)" in out[0] and len(out[1]) > 16
