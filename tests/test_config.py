"""Tests for metacorrect.config and the config-validation path of the CLI (no Ray is started)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metacorrect.cli import main
from metacorrect.config import (
    ConfigError,
    ExperimentConfig,
    MethodConfig,
    OptimConfig,
    apply_overrides,
)
from metacorrect.methods.erm import CleanOnlyConfig, ERMConfig
from metacorrect.methods.emlc import EMLCConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "digits_demo.yaml"


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig().with_overrides(overrides)
    return info.value.problems


def lines_naming(problems: list[str], dotted: str) -> list[str]:
    return [p for p in problems if p.startswith(f"{dotted}:")]


# ---------------------------------------------------------------- defaults, YAML, flat
def test_defaults_validate() -> None:
    cfg = ExperimentConfig()
    assert cfg.problems() == []
    assert isinstance(cfg.method, MethodConfig) and cfg.method.name == "erm"
    built = ExperimentConfig.from_dict({})
    assert isinstance(built.method, ERMConfig) and built.method.use_clean is True
    # A default built from an empty dict equals the dataclass defaults (erm adds use_clean).
    expected = cfg.to_dict()
    expected["method"] = {"name": "erm", "use_clean": True}
    assert built.to_dict() == expected


def test_shipped_demo_config_validates() -> None:
    cfg = ExperimentConfig.from_yaml(DEMO)
    assert cfg.data.prepare.noise == "symmetric:0.6"
    assert cfg.train.epochs == 8 and isinstance(cfg.optim.weight_decay, float)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({}).with_overrides([
        "optim.lr=0.2", "optim.schedule=multistep", "optim.milestones=[3,6]", "train.epochs=7",
        "resources.cpus_per_worker=1.5", "data.prepare.options={n: 500, image_size: 16}",
        "data.prepare.source=synthetic", "tracking.run_name=abc", "method.use_clean=false",
    ])
    path = tmp_path / "exp.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    back = ExperimentConfig.from_yaml(path)
    assert back.to_dict() == cfg.to_dict()
    assert back.optim.milestones == [3, 6]
    assert back.data.prepare.options == {"n": 500, "image_size": 16}
    assert back.method.use_clean is False and back.resources.cpus_per_worker == 1.5
    # Defaults round-trip as well (None / empty containers survive).
    default_path = tmp_path / "default.yaml"
    ExperimentConfig.from_dict({}).to_yaml(default_path)
    assert ExperimentConfig.from_yaml(default_path).to_dict() == ExperimentConfig.from_dict({}).to_dict()


def test_flat_has_dotted_keys() -> None:
    cfg = ExperimentConfig.from_dict({}).with_overrides(["optim.lr=0.3"])
    flat = cfg.flat()
    assert flat["optim.lr"] == 0.3
    assert flat["data.prepare.source"] == "digits"
    assert flat["method.name"] == "erm" and flat["method.use_clean"] is True
    assert flat["resources.num_workers"] == 2
    assert flat["data.prepare.options"] == {}  # empty mappings stay leaves
    assert not any(isinstance(v, dict) and v for v in flat.values())
    # Every leaf of the nested dict appears exactly once.
    assert len(flat) == len(set(flat))
    assert "optim" not in flat and "data.prepare" not in flat


# ---------------------------------------------------------------- overrides
def test_overrides_parse_types() -> None:
    cfg = ExperimentConfig.from_dict({}).with_overrides(
        ["optim.lr=0.1", "train.epochs=3", "resources.use_gpu=true", "optim.momentum=0",
         "resources.cpus_per_worker=null", "model.pretrained="])
    assert cfg.optim.lr == 0.1 and type(cfg.optim.lr) is float
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.resources.use_gpu is True
    assert cfg.optim.momentum == 0.0 and type(cfg.optim.momentum) is float  # int widened to float
    assert cfg.resources.cpus_per_worker is None and cfg.model.pretrained is None


def test_apply_overrides_does_not_mutate_and_creates_sections() -> None:
    raw = {"optim": {"lr": 0.05}, "method": "erm"}
    out = apply_overrides(raw, ["optim.lr=0.1", "train.epochs=3", "method.use_clean=false"])
    assert raw == {"optim": {"lr": 0.05}, "method": "erm"}
    assert out == {"optim": {"lr": 0.1}, "train": {"epochs": 3}, "method": {"name": "erm", "use_clean": False}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])


def test_from_yaml_with_overrides(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_yaml(DEMO, ["optim.lr=0.1", "train.epochs=3", "resources.use_gpu=true"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.resources.use_gpu) == (0.1, 3, True)
    assert cfg.model.arch == "small_cnn"  # untouched fields come from the file


def test_override_switches_method_class() -> None:
    cfg = ExperimentConfig.from_yaml(DEMO, ["method.name=clean_only"])
    assert type(cfg.method) is CleanOnlyConfig
    assert cfg.to_dict()["method"] == {"name": "clean_only"}
    # erm-only keys are unknown to clean_only
    problems = problems_of(["method.name=clean_only", "method.use_clean=false"])
    assert len(problems) == 1 and problems[0].startswith("method.use_clean: unknown key")


def test_for_method_drops_and_restores_method_keys() -> None:
    erm = ExperimentConfig.from_dict({}).with_overrides(["method.use_clean=false", "optim.lr=0.2"])
    clean = erm.for_method("clean_only")
    assert type(clean.method) is CleanOnlyConfig
    assert "use_clean" not in clean.to_dict()["method"] and "method.use_clean" not in clean.flat()
    assert clean.optim.lr == 0.2  # other sections kept
    back = clean.for_method("erm")
    assert type(back.method) is ERMConfig and back.method.use_clean is True  # default again
    # Same method: its own fields are kept.
    assert erm.for_method("erm").method.use_clean is False
    # Between meta methods only the engine settings travel; method-specific values do not.
    mlc = ExperimentConfig.from_dict({}).with_overrides(["method.name=mlc", "method.k=3", "method.meta_lr=0.5"])
    emlc = mlc.for_method("emlc")
    assert emlc.method.k == 3 and emlc.method.meta_lr == EMLCConfig().meta_lr
    with pytest.raises(ConfigError) as info:
        erm.for_method("foo")
    assert info.value.problems[0].startswith("method.name: unknown method 'foo'")


# ---------------------------------------------------------------- validation: one line per problem
@pytest.mark.parametrize("override, dotted, fragment", [
    ("optim.lrr=0.1", "optim.lrr", "unknown key"),
    ("train.epochs=abc", "train.epochs", "expected int, got 'abc'"),
    ("train.epochs=2.5", "train.epochs", "expected int"),
    ("resources.use_gpu=1", "resources.use_gpu", "expected bool"),
    ("optim.lr=-0.1", "optim.lr", "must be > 0, got -0.1"),
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("train.epochs=0", "train.epochs", "must be >= 1, got 0"),
    ("method.name=foo", "method.name", "unknown method 'foo'"),
    ("data.prepare.source=nope", "data.prepare.source", "unknown source 'nope'"),
    ("data.prepare.noise=gaussian:0.3", "data.prepare.noise", "unknown kind 'gaussian'"),
    ("data.prepare.noise=symmetric:1.5", "data.prepare.noise", "outside [0, 1]"),
    ("model.arch=vgg16", "model.arch", "unknown architecture 'vgg16'"),
    ("train.batch_size=63", "train.batch_size", "63 is not divisible by resources.num_workers=2"),
    ("data.augment=rotate", "data.augment", "got 'rotate'"),
    ("optim.schedule=step", "optim.schedule", "got 'step'"),
    ("model.pretrained=/nonexistent/weights.pt", "model.pretrained", "file not found"),
    ("data.prepare.test_fraction=1.0", "data.prepare.test_fraction", "must be in (0, 1)"),
    ("optim=0.1", "optim", "expected a section"),
])
def test_invalid_value_reported_on_one_line(override: str, dotted: str, fragment: str) -> None:
    problems = problems_of([override])
    assert len(problems) == 1, problems
    assert len(lines_naming(problems, dotted)) == 1
    assert fragment in problems[0]
    assert "\n" not in problems[0]


@pytest.mark.parametrize("name, override, fragment", [
    ("mlc", "method.k=0", "method.k: must be >= 1, got 0"), ("emlc", "method.k=0", "method.k: must be >= 1"),
    ("mlc", "method.meta_lr=-0.001", "method.meta_lr: must be > 0"), ("emlc", "method.meta_lr=-1", "method.meta_lr"),
    ("mlc", "method.alpha=1.5", "method.alpha: must be in [0, 1] or null (a learned per-sample gate), got 1.5"),
    ("mlc", "method.alpha=-0.1", "method.alpha"), ("mlc", "method.meta_grad=slow", "got 'slow'"),
    ("emlc", "method.corruption=sideways", "method.corruption: expected one of"),
    ("mslg", "method.logit_scale=-1", "method.logit_scale: must be > 0, got -1"),
    ("mslg", "method.K=10", "method.K: renamed to method.logit_scale"), ("emlc", "method.discount=projection", "method.discount: expected one of shrink, momentum"), ("mslg", "method.label_lr=0", "method.label_lr"),
    ("mslg", "method.lookahead_lr=-0.5", "method.lookahead_lr: must be > 0 or null (the real step), got -0.5"),
    ("soft_labels", "method.mode=both", "method.mode: expected one of class, instance, got 'both'"),
    ("soft_labels", "method.p0=1.0", "method.p0: must be in (0, 1), got 1.0"),
    ("ieg", "method.views=0", "method.views"), ("ieg", "method.strong_augment=autoaugment", "method.strong_augment"),
    ("ieg", "method.temperature=0", "method.temperature"), ("ieg", "method.mix_init=1.5", "method.mix_init"),
    ("ieg", "method.ema_decay=1", "method.ema_decay: must be in [0, 1), got 1"), ("ieg", "method.meta_grad=slow", "got 'slow'"),
    ("mwnet", "method.meta_lr=0", "method.meta_lr"), ("mwnet", "method.hidden_dim=0", "method.hidden_dim"),
    ("l2rw", "method.meta_grad=slow", "method.meta_grad: expected one of fast, exact, got 'slow'"),
    ("erm", "resources.cpus_per_worker=0", "resources.cpus_per_worker: must be > 0 or null"),
    ("erm", "tracking.register_model=a/b", "tracking.register_model: expected a model registry name"),
])
def test_method_field_reported_on_one_line(name: str, override: str, fragment: str) -> None:
    """Every method's config names the field it rejects, on one line (the same wording as the other sections)."""
    with pytest.raises(ConfigError) as info:
        ExperimentConfig().for_method(name).with_overrides([override])
    field = override.split("=")[0]
    assert [p.split(":")[0] for p in info.value.problems] == [field]
    assert fragment in info.value.problems[0]


def test_field_rules_reject_wrong_types_without_raising() -> None:
    from metacorrect.checks import COUNT, POSITIVE, field_problems, one_of

    class Section:
        k, lr, mode, gate = 2.0, "fast", 3, None

    assert field_problems("s", Section(), {"k": COUNT, "lr": POSITIVE, "mode": one_of(("a", "b")),
                                           "gate": POSITIVE.or_null("off")}) == [
        "s.k: must be >= 1, got 2.0", "s.lr: must be > 0, got fast", "s.mode: expected one of a, b, got '3'"]


def test_batch_sizes_checked_against_num_workers() -> None:
    problems = problems_of(["resources.num_workers=3"])
    assert sorted(p.split(":")[0] for p in problems) == ["train.batch_size", "train.clean_batch_size"]
    # num_workers=0 (driver loop) counts as one worker: any batch size is fine
    cfg = ExperimentConfig.from_dict({}).with_overrides(["resources.num_workers=0", "train.batch_size=63"])
    assert cfg.train.batch_size == 63


def test_several_problems_reported_together() -> None:
    problems = problems_of(["optim.lrr=0.1", "train.epochs=abc", "optim.lr=-1", "model.arch=vgg16",
                            "data.prepare.source=nope", "data.prepare.noise=bogus", "train.batch_size=63"])
    assert len(problems) == 7, problems
    for dotted in ("optim.lrr", "train.epochs", "optim.lr", "model.arch", "data.prepare.source",
                   "data.prepare.noise", "train.batch_size"):
        assert len(lines_naming(problems, dotted)) == 1, (dotted, problems)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig().with_overrides(["optim.lr=-1", "train.epochs=0"])
    assert str(info.value).splitlines() == info.value.problems
    assert isinstance(info.value, ValueError)


def test_section_validators_return_lines() -> None:
    assert OptimConfig(lr=-1.0, momentum=1.0).validate() == [
        "optim.lr: must be > 0, got -1.0", "optim.momentum: must be in [0, 1), got 1.0"]


def test_from_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        ExperimentConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1\ntrain: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ExperimentConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ExperimentConfig.from_yaml(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert ExperimentConfig.from_yaml(empty).to_dict() == ExperimentConfig.from_dict({}).to_dict()


# ---------------------------------------------------------------- CLI: invalid config exits 2 before Ray
def _ray_running() -> bool:
    if "ray" not in sys.modules:
        return False
    return bool(sys.modules["ray"].is_initialized())


def test_cli_invalid_override_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", str(DEMO), "--set", "optim.lr=-1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "error: optim.lr: must be > 0, got -1.0" in err.splitlines()
    assert not _ray_running()


def test_cli_reports_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compare", str(DEMO), "--methods", "erm,clean_only", "--set", "optim.lr=-1",
               "--set", "train.epochs=0", "--quiet"])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert "error: optim.lr: must be > 0, got -1.0" in lines
    assert "error: train.epochs: must be >= 1, got 0" in lines
    assert not _ray_running()


def test_cli_invalid_config_in_fresh_process_never_imports_ray() -> None:
    code = ("import sys; from metacorrect.cli import main; "
            f"rc = main(['run', {str(DEMO)!r}, '--set', 'optim.lr=-1', '--quiet']); "
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "NO_RAY"
    assert "error: optim.lr: must be > 0, got -1.0" in proc.stderr


def test_what_rays_own_processes_load_of_the_project_never_imports_torch() -> None:
    """Ray starts processes that never train but load a module of the project: every worker its setup hook, Ray
    Train's controller the failure policy, the dataset manager the data config, Ray Data's tasks the stream's
    decoder. Importing torch would cost each of them about 1.5 CPU-seconds, dozens of times per test session."""
    modules = ("metacorrect.platform.workers", "metacorrect.platform.failure_policy",
               "metacorrect.platform.data_config", "metacorrect.datasets.stream")
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    rc = main(["run", str(missing), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "nope.yaml" in err and "not found" in err
    assert not _ray_running()


def test_cli_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [0.1\n")
    rc = main(["run", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.yaml" in err and "not valid YAML" in err
    assert not _ray_running()


def test_cli_console_script_exit_code(tmp_path: Path) -> None:
    exe = ROOT / ".venv" / "bin" / "metacorrect"
    if not exe.exists():
        pytest.skip("console script not installed")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"optim": {"lr": 0.1}, "model": {"arch": "vgg16"}}))
    proc = subprocess.run([str(exe), "run", str(cfg), "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0].startswith("error: model.arch: unknown architecture 'vgg16'")
    assert proc.stdout == ""


def test_scale_fields_parse_and_renamed_fields_name_their_successor() -> None:
    cfg = ExperimentConfig().with_overrides(["train.eval_noisy=off", "train.checkpoint_every=500",
                                             "train.precision=bf16", "model.channels_last=true"])
    assert (cfg.train.eval_noisy, cfg.train.checkpoint_every, cfg.train.precision, cfg.model.channels_last) == \
        ("off", 500, "bf16", True), "YAML reads `off` as false; the text field keeps the word"
    with pytest.raises(ConfigError, match=r"train.eval_noisy_train: renamed to train.eval_noisy"):
        ExperimentConfig().with_overrides(["train.eval_noisy_train=false"])
    assert ExperimentConfig().with_overrides(["train.precision=fp16"]).train.precision == "fp16"
    with pytest.raises(ConfigError, match=r"train.precision: expected one of fp32, bf16, fp16, got 'fp8'"):
        ExperimentConfig().with_overrides(["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"train.checkpoint_every: must be >= 0"):
        ExperimentConfig().with_overrides(["train.checkpoint_every=-1"])
