"""Files written safely: temporary names nobody can predict, created exclusively and never
through a symlink; `export` staged whole and renamed into place; a kill midway leaves a state
that the same command, run again, replaces (stale temporary copies removed); overwrites said."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

import lora_tune
from lora_tune import safe_files as files
from lora_tune.cli.main import cli
from lora_tune.export import export_trials
from lora_tune.study.trial.artifacts import trials_with_adapters
from tests.export.tiny_lora_study import build_base, run_study
from tests.report.lora_study_factory import make_lora_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[2]
_EVENTS: list[tuple[str, tuple]] | None = None  # filled while a test watches (audit hooks stay for good)


def _audit(event: str, args: tuple) -> None:
    if _EVENTS is not None and event in ("open", "os.rename"):
        _EVENTS.append((event, args))


sys.addaudithook(_audit)


def _watch(action) -> list[tuple[str, tuple]]:
    """The files opened and renamed (audit events) while ``action()`` runs."""
    global _EVENTS
    _EVENTS = []
    try:
        action()
        return list(_EVENTS)
    finally:
        _EVENTS = None


def _written_in(events, folder: Path) -> list[tuple[str, int]]:
    """(path, flags) of every file opened for writing in ``folder``."""
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    return [(str(a[0]), a[2]) for e, a in events if e == "open" and isinstance(a[0], (str, bytes, os.PathLike))
            and Path(os.fsdecode(a[0])).parent == folder and isinstance(a[2], int) and a[2] & write]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def mixed():
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"odd": 3}))
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={"odd": "n/a"}))
    return study


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_trials_creates_its_temporary_file_exclusively_under_a_random_name(mixed, tmp_path, suffix):
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    out = tmp_path / f"t{suffix}"
    for name in (f".{out.name}.tmp", f".{out.name}.{os.getpid()}.tmp"):  # the names once used
        (tmp_path / name).symlink_to(victim)
    names = []
    for _ in range(2):
        events = _watch(lambda: export_trials(mixed, out))
        written = _written_in(events, tmp_path)
        assert written, "the table is written through a file Python creates"
        for path, flags in written:
            assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT, path
            assert any(e == "os.rename" and os.fspath(a[0]) == path and os.fspath(a[1]) == str(out) for e, a in events)
        names += [Path(p).name for p, _ in written]
    assert len(set(names)) == len(names) == 2  # a new random name each time
    assert victim.read_text() == "not yours"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["t" + suffix, "victim.txt"]


def test_export_trials_overwrite_is_said_and_a_symlinked_output_is_written_through(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_lora_study(url, name="exp")
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    link.symlink_to(real)
    runner = CliRunner()
    first = runner.invoke(cli, ["study", "export-trials", "exp", "--storage", url, "-o", str(link)])
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith(f"wrote {real} ")
    again = runner.invoke(cli, ["study", "export-trials", "exp", "--storage", url, "-o", str(link)])
    assert again.exit_code == 0 and again.stdout.startswith(f"overwrote {real} ")
    assert link.is_symlink() and real.read_text().startswith("number,")


def test_export_yaml_overwrite_is_said(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_lora_study(url, name="exp")
    out = tmp_path / "best.yaml"
    runner = CliRunner()
    first = runner.invoke(cli, ["export", "exp", "--storage", url, "--trial", "4", "-o", str(out)])
    assert first.exit_code == 0 and first.stdout.startswith(f"wrote {out}: trial #4")
    again = runner.invoke(cli, ["export", "exp", "--storage", url, "--trial", "2", "-o", str(out)])
    assert again.exit_code == 0 and again.stdout.startswith(f"overwrote {out}: trial #2")
    assert yaml.safe_load(out.read_text())["trial"]["number"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_adapter_never_writes_through_a_planted_symlink(tmp_path):
    model = build_base()
    lora_tune.inject(model, lora_tune.LoraConfig(rank=2))
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter.safetensors", "adapter_config.json"):
        (folder / f".{name}.{os.getpid()}.tmp").symlink_to(victim)  # the names once used
    events = _watch(lambda: lora_tune.save_adapter(model, folder))
    written = _written_in(events, folder)
    assert len(written) == 2 and all(f & os.O_EXCL and f & os.O_NOFOLLOW for _, f in written)
    assert victim.read_text() == "not yours"
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == ["adapter.safetensors",
                                                                              "adapter_config.json"]
    lora_tune.load_adapter(build_base(), folder)
    assert oct((folder / "adapter_config.json").stat().st_mode & 0o777) == oct(0o666 & ~files.umask())


def test_stale_temporary_names_of_dead_processes_of_this_host_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = files.temp_prefix("best.yaml")
    mine = prefix.rsplit("-", 1)[0] + "-"  # .best.yaml.lt-HOST-
    stale_file = tmp_path / f"{mine}{dead.pid}.abc123.tmp"
    stale_dir = tmp_path / f"{mine}{dead.pid}.xyz789"
    live = tmp_path / f"{mine}{os.getppid()}.abc123.tmp"
    other_host = tmp_path / f".best.yaml.lt-zzzzzz-{dead.pid}.abc123.tmp"
    other_name = tmp_path / f"{files.temp_prefix('other.yaml').rsplit('-', 1)[0]}-{dead.pid}.abc123.tmp"
    mine_but_odd = tmp_path / f"{mine}notapid.abc123.tmp"
    for p in (stale_file, live, other_host, other_name, mine_but_odd):
        p.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "inside").write_text("x")
    files.write_atomic(tmp_path / "best.yaml", "a: 1\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["best.yaml", live.name, other_host.name, other_name.name, mine_but_odd.name])


# -- export with --adapter: a real tiny study with saved adapters --------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-safe")
    url = f"sqlite:///{folder / 'tiny.db'}"
    study = run_study(url)
    first, *_, last = trials_with_adapters(study)
    reference = {}
    for number in (first, last):
        dest = folder / f"ref-{number}"
        result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(number),
                                          "-o", str(folder / f"ref-{number}.yaml"), "--adapter", str(dest)])
        assert result.exit_code == 0, result.stderr
        reference[number] = _tree(dest)
    assert reference[first] != reference[last]
    return url, first, last, reference


def _export(url: str, folder: Path, number: int):
    return CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(number),
                                    "-o", str(folder / "best.yaml"), "--adapter", str(folder / "adapter")])


def _killed_export(url: str, folder: Path, number: int, at: str) -> int:
    """Run the export in a child process that SIGKILLs itself at a rename: ``staged`` the first
    one, ``adapter`` the one onto the adapter folder, ``yaml`` the one onto best.yaml."""
    targets = {"staged": None, "adapter": str(folder / "adapter"), "yaml": str(folder / "best.yaml")}
    code = textwrap.dedent(f"""
        import os, signal, sys
        target = {targets[at]!r}
        real_rename, real_replace = os.rename, os.replace

        def kill_at(real):
            def rename(src, dst, *args, **kwargs):
                if target is None or os.fspath(dst) == target:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst, *args, **kwargs)
            return rename

        os.rename, os.replace = kill_at(real_rename), kill_at(real_replace)
        from lora_tune.cli.main import cli
        cli.main(["export", "tiny", "--storage", {url!r}, "--trial", "{number}", "-o", {str(folder / "best.yaml")!r},
                  "--adapter", {str(folder / "adapter")!r}])
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300).returncode


@pytest.mark.slow
@pytest.mark.parametrize("at", ["staged", "adapter", "yaml"])
def test_an_export_killed_midway_leaves_a_state_the_same_command_replaces(tiny, tmp_path, at):
    url, first, last, reference = tiny
    assert _export(url, tmp_path, first).exit_code == 0
    assert _killed_export(url, tmp_path, last, at) == -signal.SIGKILL
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["trial"]["number"] == first  # the YAML comes last
    assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # it was killed with its copies staged
    if at == "staged":  # nothing renamed yet: the old pair
        assert _tree(tmp_path / "adapter") == reference[first]
    if at == "yaml":  # the new adapter beside the old YAML
        assert _tree(tmp_path / "adapter") == reference[last]

    result = _export(url, tmp_path, last)
    assert result.exit_code == 0, result.stderr
    assert f"overwrote {tmp_path / 'best.yaml'}: trial #{last}" in result.stdout
    content = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert content["trial"]["number"] == last and content["adapter"]["path"] == str(tmp_path / "adapter")
    assert _tree(tmp_path / "adapter") == reference[last]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "best.yaml"]  # no staging left


@pytest.mark.slow
def test_a_failure_after_staging_places_nothing_and_leaves_no_staging(tiny, tmp_path):
    """The YAML cannot be created (a folder that takes no new file, even for root): the adapter,
    already staged, must not be placed without it."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    url, first, _, _ = tiny
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(first),
                                      "-o", "/proc/best.yaml", "--adapter", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "output: got '/proc/best.yaml'" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_damaged_adapter_archive_is_a_clear_error_and_leaves_no_staging(tiny, tmp_path):
    import shutil

    url, first, _, _ = tiny
    study = optuna.load_study(study_name="tiny", storage=url)
    store = tmp_path / "store"
    shutil.copytree(study.user_attrs["artifact_dir"], store)
    for archive in store.iterdir():
        archive.write_bytes(b"PK\x03\x04 not a zip archive")
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(first), "-o",
                                      str(out / "best.yaml"), "--adapter", str(out / "adapter"),
                                      "--artifact-dir", str(store)])
    assert result.exit_code == 2 and "is damaged" in result.stderr, result.output + result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("odd", ["symlink-to-empty-dir", "symlink-to-adapter", "dangling-symlink", "file",
                                 "folder-of-other-files"])
def test_odd_adapter_paths_are_refused_naming_adapter(tiny, tmp_path, odd):
    url, first, _, _ = tiny
    empty, exported = tmp_path / "empty", tmp_path / "exported"
    empty.mkdir()
    exported.mkdir()
    assert _export(url, exported, first).exit_code == 0
    path = tmp_path / "given"
    if odd == "symlink-to-empty-dir":
        path.symlink_to(empty)
    elif odd == "symlink-to-adapter":
        path.symlink_to(exported / "adapter")
    elif odd == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif odd == "file":
        path.write_text("mine")
    else:
        path.mkdir()
        (path / "manifest.json").write_text('{"formats": []}')
        (path / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(first),
                                      "-o", str(tmp_path / "b.yaml"), "--adapter", str(path)])
    assert result.exit_code == 2 and f"--adapter: got '{path}'" in result.stderr, result.output + result.stderr
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output + result.stderr
    assert _tree(tmp_path) == before and not (tmp_path / "b.yaml").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
