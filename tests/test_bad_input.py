"""Bad input found by hand: each gets a clear error (exit 2 from the CLI, no traceback) and harms nothing, and a
refused command never changes a directory rr did not create."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rr.config import CONFIG_MAX_BYTES, SEED_MAX, load_config
from rr.errors import ConfigError, JobDirError

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "ci.yaml"


@pytest.fixture
def rr_cli(monkeypatch):
    """Run `rr ...` in this process; the umask the job commands set is restored after."""
    from rr.cli import app

    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at the terminal width: keep messages on one line
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"):
        monkeypatch.delenv(key, raising=False)
    umask = os.umask(0o022)
    os.umask(umask)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        # A refusal is a message and an exit code, never an exception escaping the command.
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{result.output}\n{result.exception!r}"
        return result

    yield run
    os.umask(umask)


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# ---- the config file itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", "name: x\n".encode("utf-16"), bytes(range(256)) * 4],
                         ids=["latin-1", "utf-16", "binary"])
def test_a_config_that_is_not_utf8_text_is_refused_naming_the_file(tmp_path, rr_cli, content):
    bad = _write(tmp_path / "bad config.yaml", content)
    result = rr_cli("reveal", "--config", bad, "--output", tmp_path / "job")
    assert result.exit_code == 2
    assert str(bad) in result.output and ("UTF-8" in result.output)
    assert not (tmp_path / "job").exists()


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = _write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    assert bomb.stat().st_size < 400
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="anchors and aliases") as error:
        load_config(bomb)
    assert time.perf_counter() - started < 1 and len(str(error.value)) < 600


def test_a_huge_value_is_quoted_short_and_a_huge_file_is_refused_by_size(tmp_path):
    long_value = _write(tmp_path / "long.yaml", "name: " + "y" * 200_000 + "\n")
    with pytest.raises(ConfigError, match="name") as error:
        load_config(long_value)
    assert len(str(error.value)) < 400
    huge = _write(tmp_path / "huge.yaml", "# padding\n" * (CONFIG_MAX_BYTES // 10 + 1))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="larger than"):
        load_config(huge)
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("text, key", [("seed: 1\nseed: 2\n", "seed"),
                                       ("reveal:\n  n_arms: 8\n  n_arms: 16\n", "n_arms")])
def test_a_duplicate_key_is_refused_naming_it(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"duplicate key '{key}'"):
        load_config(_write(tmp_path / "dup.yaml", text))


@pytest.mark.parametrize("text, field", [("reveal:\n  n_arms: 1000000000000\n", "reveal.n_arms"),
                                         ("release:\n  iterations: 1000000000\n", "release.iterations"),
                                         ("compare:\n  rmu:\n    layer: 3\n    update_layers: [2, 5]\n",
                                          "compare.rmu"),
                                         ("compare:\n  rmu:\n    update_layers: [-1]\n", "compare.rmu.update_layers")])
def test_absurd_sizes_and_layers_are_refused(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(_write(tmp_path / "job.yaml", text))


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**32, 2**64])
def test_a_seed_out_of_range_is_refused_before_any_directory_exists(tmp_path, rr_cli, seed):
    config = _write(tmp_path / "job.yaml", f"seed: {seed}\n")
    result = rr_cli("reveal", "--config", config, "--output", tmp_path / "job")
    assert result.exit_code == 2 and "seed" in result.output
    assert not (tmp_path / "job").exists()


# ---- user text through rich -------------------------------------------------------------------------------


def test_markup_in_a_job_name_or_a_path_is_shown_verbatim(tmp_path, rr_cli):
    import yaml

    data = yaml.safe_load(CI_CONFIG.read_text())
    data["name"] = "x[/cyan] [bold]y"
    config = _write(tmp_path / "job.yaml", yaml.safe_dump(data))
    job_dir = tmp_path / "[red]job[/red]"
    result = rr_cli("release", "--config", config, "--output", job_dir)  # no forget set yet: refused after the banner
    assert result.exit_code == 2, result.output
    assert "x[/cyan] [bold]y" in result.output
    assert f"{job_dir}" in result.output and "rr reveal" in result.output
    bad_key = _write(tmp_path / "key.yaml", "reveal:\n  '[/cyan]x': 1\n")
    result = rr_cli("reveal", "--config", bad_key, "--output", tmp_path / "other")
    assert result.exit_code == 2 and "reveal.[/cyan]x" in result.output


# ---- the job directory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved", [b"- a\n- list\n", b"reveal: [unclosed\n", b"seed: caf\xe9\n"],
                         ids=["list", "junk-yaml", "not-utf8"])
def test_a_job_directory_holding_a_foreign_config_is_refused_and_left_alone(tmp_path, saved):
    from rr.job import Job

    job_dir = tmp_path / "job"
    job_dir.mkdir(mode=0o700)
    (job_dir / "config.yaml").write_bytes(saved)
    with pytest.raises(ConfigError, match="config.yaml"):
        Job(load_config(CI_CONFIG, job_dir))
    assert (job_dir / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in job_dir.iterdir()) == ["config.yaml"]


def test_a_new_job_directory_is_owner_only(tmp_path):
    from rr.job import JOB_DIR_MARKER, Job

    job = Job(load_config(CI_CONFIG, tmp_path / "new" / "job"))
    assert stat.S_IMODE(job.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((job.dir / "config.yaml").stat().st_mode) == 0o600
    assert (job.dir / JOB_DIR_MARKER).is_file()
    assert stat.S_IMODE(job.write_json("reveal/manifest.json", {}).stat().st_mode) == 0o600
    os.chmod(job.dir, 0o755)  # rr's own directory, opened up since: rr closes it again
    Job(job.config)
    assert stat.S_IMODE(job.dir.stat().st_mode) == 0o700


def test_a_shared_directory_is_never_chmodded_and_is_refused(tmp_path, rr_cli):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    other = _write(shared / "config.yaml", "name: someone-elses-job\n")
    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    result = rr_cli("reveal", "--config", CI_CONFIG, "--output", shared)
    assert result.exit_code == 2
    assert "others can access it" in result.output and "owner-only" in result.output
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before and other.read_text().startswith("name")
    from rr.job import Job

    with pytest.raises(JobDirError):  # the same through the library
        Job(load_config(CI_CONFIG, shared))
    inside = Job(load_config(CI_CONFIG, shared / "mine"))  # a new directory rr creates in it is private
    assert stat.S_IMODE(inside.dir.stat().st_mode) == 0o700


# ---- flags: Kubernetes names and the registry -------------------------------------------------------------


def test_a_bad_namespace_is_refused_before_any_cluster_call(tmp_path, rr_cli):
    for args in (["submit", "--config", CI_CONFIG, "-n", "Bad_NS!", "--dry-run"],
                 ["submit", "--config", CI_CONFIG, "-n", "Bad_NS!"], ["status", "my-job", "-n", "Bad_NS!"],
                 ["logs", "Bad_Name!"]):
        result = rr_cli(*args)
        assert result.exit_code == 2 and "DNS-1123" in result.output, (args, result.output)


def test_promote_refuses_a_tracking_uri_that_is_not_a_uri_and_creates_nothing(tmp_path, rr_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = rr_cli("promote", "m", "1", "--tracking-uri", "notauri")
    assert result.exit_code == 2 and "--tracking-uri 'notauri': not a URI" in result.output
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_registry_is_reported_within_ten_seconds(rr_cli):
    # MLflow's defaults retry 7 times with exponential backoff: minutes on a refused port; rr bounds them.
    started = time.perf_counter()
    result = rr_cli("promote", "m", "1", "--tracking-uri", f"http://127.0.0.1:{_free_port()}")
    assert time.perf_counter() - started < 10
    assert result.exit_code == 2 and "is unreachable" in result.output
    assert "not in the registry" not in result.output


def test_a_registry_that_never_answers_is_reported_within_ten_seconds(rr_cli):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.perf_counter()
        result = rr_cli("models", "m", "--tracking-uri", f"http://127.0.0.1:{silent.getsockname()[1]}")
        elapsed = time.perf_counter() - started
    assert elapsed < 10
    assert result.exit_code == 2 and "is unreachable" in result.output


def test_promote_refuses_a_version_that_is_not_a_number(rr_cli, tmp_path):
    result = rr_cli("promote", "m", "latest[/red]", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert result.exit_code == 2 and "'latest[/red]'" in result.output


def test_eval_refuses_a_step_the_ledger_did_not_apply_and_a_step_without_a_ledger(tmp_path, rr_cli):
    from rr.release.ledger import Ledger, LedgerEntry

    ledger = tmp_path / "ledger.json"
    Ledger("embedded:smollm2", [LedgerEntry("step1-forget", "pems/step1-forget", "forget", -2.0, 1),
                                LedgerEntry("step2-retain", "pems/step2-retain", "retain", 0.5, 2)]).save(ledger)
    result = rr_cli("eval", "--config", CI_CONFIG, "--output", tmp_path / "job", "--ledger", ledger, "--step", 3)
    assert result.exit_code == 2 and "--step 3" in result.output and "[1, 2]" in result.output
    result = rr_cli("eval", "--config", CI_CONFIG, "--output", tmp_path / "job", "--step", 1)
    assert result.exit_code == 2 and "--step needs --ledger" in result.output
