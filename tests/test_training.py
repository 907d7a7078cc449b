"""recsim.training.build_trainer: every cfg.trainer key reaches the Lightning Trainer; runner.train and the
EvoRec filter build their Trainers through it."""

import lightning
import pytest
import torch
from omegaconf import OmegaConf

from recsim import training
from recsim.training import CompileModel, build_trainer, default_precision

CFG = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": None, "deterministic": True,
       "gradient_clip_val": 1.0, "accumulate_grad_batches": 1, "compile": False, "progress_bar": False,
       "batch_size": 8, "base": {"lr": 1e-3}}  # keys build_trainer does not read are ignored


@pytest.fixture
def recorded(monkeypatch):
    """Capture the arguments given to lightning.Trainer instead of building one."""
    calls = []
    monkeypatch.setattr(training.lightning, "Trainer", lambda **kw: calls.append(kw) or kw)
    return calls


def test_every_key_is_mapped(recorded):
    cfg = OmegaConf.create({**CFG, "accelerator": "gpu", "devices": 4, "strategy": "ddp", "num_nodes": 2,
                            "precision": "16-mixed", "deterministic": False, "gradient_clip_val": 0.5,
                            "accumulate_grad_batches": 3, "progress_bar": True})
    kw = build_trainer(cfg, max_epochs=5, max_steps=7, loggers=["L"], callbacks=["C"], enable_validation=True)
    assert {k: kw[k] for k in ("accelerator", "devices", "strategy", "num_nodes", "precision", "deterministic",
                               "gradient_clip_val", "accumulate_grad_batches", "max_epochs", "max_steps", "logger",
                               "callbacks", "limit_val_batches", "enable_progress_bar", "enable_checkpointing")} == {
        "accelerator": "gpu", "devices": 4, "strategy": "ddp", "num_nodes": 2, "precision": "16-mixed",
        "deterministic": False, "gradient_clip_val": 0.5, "accumulate_grad_batches": 3, "max_epochs": 5,
        "max_steps": 7, "logger": ["L"], "callbacks": ["C"], "limit_val_batches": None, "enable_progress_bar": True,
        "enable_checkpointing": False}


def test_defaults_no_step_limit_no_validation_and_compile(recorded):
    kw = build_trainer({"accelerator": "cpu"}, max_epochs=1, max_steps=None, progress_bar=False)
    assert (kw["devices"], kw["strategy"], kw["num_nodes"], kw["accumulate_grad_batches"]) == (1, "auto", 1, 1)
    assert (kw["precision"], kw["max_steps"], kw["limit_val_batches"], kw["callbacks"]) == ("32-true", -1, 0, [])
    assert kw["logger"] is False and kw["enable_progress_bar"] is False
    kw = build_trainer({"compile": True}, max_epochs=1, max_steps=0, progress_bar=True)
    assert kw["max_steps"] == -1 and kw["enable_progress_bar"] is True
    assert [type(c) for c in kw["callbacks"]] == [CompileModel]


def test_null_precision_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (default_precision("auto"), default_precision("gpu"), default_precision("cpu")) == \
        ("bf16-mixed", "bf16-mixed", "32-true")  # an explicit CPU run stays fp32 even on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") == "32-true"


def test_real_trainer_on_cpu():
    t = build_trainer({**CFG, "precision": "bf16-mixed", "gradient_clip_val": 0.25, "accumulate_grad_batches": 2},
                      max_epochs=3, max_steps=10)
    assert isinstance(t, lightning.Trainer)
    assert (t.max_epochs, t.max_steps, t.gradient_clip_val, t.accumulate_grad_batches, t.num_devices, t.num_nodes) == \
        (3, 10, 0.25, 2, 1, 1)
    assert t.precision == "bf16-mixed" and type(t.accelerator).__name__ == "CPUAccelerator"
    assert t.progress_bar_callback is None and t.limit_val_batches == 0


def test_compile_callback_compiles_the_network_in_place():
    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    m = Module()
    names = list(m.state_dict())
    CompileModel().setup(None, m, "fit")
    assert m.model._compiled_call_impl is not None and list(m.state_dict()) == names  # no _orig_mod. prefix


def test_compile_mode_reaches_torch_compile(recorded, monkeypatch):
    kw = build_trainer({"compile": True, "compile_mode": "reduce-overhead"}, max_epochs=1)
    (callback,) = kw["callbacks"]
    assert isinstance(callback, CompileModel) and callback.mode == "reduce-overhead"
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    module = lightning.LightningModule()
    module.model = torch.nn.Linear(2, 2)
    callback.setup(None, module, "fit")
    CompileModel().setup(None, module, "fit")  # no mode: torch.compile's default
    assert seen == [{"mode": "reduce-overhead"}, {}]


class Recorder:
    """A recommender stand-in for runner.train: records what fit received."""

    def __init__(self, with_callbacks: bool):
        self.module = torch.nn.Linear(1, 1)
        self.collate = lambda batch: torch.tensor(batch, dtype=torch.float32)
        if with_callbacks:
            self.callbacks = lambda: ["early-stop"]

    def set_optim(self, optim):
        self.optim = optim


@pytest.mark.parametrize("with_callbacks", [True, False])
def test_runner_train_passes_validation_and_callbacks(monkeypatch, tmp_path, with_callbacks):
    from recsim import runner

    built, fits = [], []

    class FakeTrainer:
        def fit(self, module, train_loader, val_loader=None):
            fits.append((train_loader, val_loader))

    monkeypatch.setattr(runner, "build_trainer", lambda cfg, **kw: built.append(kw) or FakeTrainer())
    monkeypatch.setattr(runner, "_loggers", lambda cfg, out, version: False)
    cfg = OmegaConf.create({"trainer": CFG, "logger": {"wandb": False}})
    rec = Recorder(with_callbacks)
    optim = OmegaConf.create({"epochs": 2, "max_steps": None})
    runner.train(cfg, rec, [1.0, 2.0, 3.0], optim, 2, 0, tmp_path, "v", val_samples=[4.0, 5.0, 6.0])
    (kw,) = built
    assert (kw["max_epochs"], kw["max_steps"]) == (2, None)
    train_loader, val_loader = fits[0]
    if with_callbacks:
        assert kw["callbacks"] == ["early-stop"] and kw["enable_validation"] is True
        assert [b.tolist() for b in val_loader] == [[4.0, 5.0], [6.0]]  # in order, the recommender's collate
    else:  # nothing would consume the validation loop: it is not run
        assert kw["callbacks"] is None and kw["enable_validation"] is False and val_loader is None


def test_filter_fit_inherits_accelerator_precision_deterministic(monkeypatch):
    from recsim.methods import forget

    built = []

    class FakeTrainer:
        def fit(self, module, loader):
            pass

    monkeypatch.setattr(training, "build_trainer", lambda cfg, **kw: built.append((cfg, kw)) or FakeTrainer())
    spec = {"max_len": 5, "batch_size": 4}
    forget._fit(None, [object()], spec, epochs=2, seed=0)  # no trainer config: the filter's own defaults
    forget._fit(None, [object()], spec, epochs=2, seed=0,
                trainer_cfg=OmegaConf.create({**CFG, "precision": "bf16-mixed", "deterministic": False}))
    gpu = "gpu" if torch.cuda.is_available() else "cpu"
    assert built[0][0] == {"accelerator": gpu, "precision": "32-true", "deterministic": True}
    assert built[1][0] == {"accelerator": "cpu", "precision": "bf16-mixed", "deterministic": False}
    assert built[0][1]["max_epochs"] == 2


def test_reuse_freed_memory_keeps_a_freed_large_block_resident():
    """With glibc's mmap off, a freed 256 MB tensor stays in the heap (RSS stays up) instead of being
    unmapped; without the setting it is returned to the OS at once. Run in fresh processes: the setting
    is process-wide."""
    import subprocess
    import sys

    code = """
import sys, psutil, torch
from recsim.utils.resources import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else None
proc = psutil.Process()
x = torch.ones(64, 1024, 1024)   # 256 MB, touched
del x
print(applied, proc.memory_info().rss)
"""
    out = {}
    for mode in ("on", "off"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        applied, rss = res.stdout.split()
        out[mode] = (applied, int(rss))
    if out["on"][0] != "True":
        pytest.skip("not glibc: mallopt unavailable")
    assert out["on"][1] - out["off"][1] > 200 * 2**20


def test_log_every_n_steps_reaches_the_trainer(recorded):
    assert build_trainer({**CFG, "log_every_n_steps": 25}, max_epochs=1)["log_every_n_steps"] == 25
    assert build_trainer(CFG, max_epochs=1)["log_every_n_steps"] == 1  # the default: every step, as before


class _Lengths:
    """A recommender stand-in whose samples are their own token counts."""

    def collate(self, batch):
        return batch

    def sample_length(self, sample):
        return sample


def test_group_by_length_batches_similar_lengths_and_is_seeded():
    from recsim.runner import training_loader

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 300, (400,), generator=rng).tolist()
    cfg = OmegaConf.create({"trainer": {"group_by_length": True}})
    grouped = list(training_loader(cfg, _Lengths(), lengths, 8, seed=3))
    shuffled = list(training_loader(OmegaConf.create({"trainer": {}}), _Lengths(), lengths, 8, seed=3))
    padded = lambda batches: sum(len(b) * max(b) for b in batches)  # tokens a left-padded batch computes
    assert sorted(x for b in grouped for x in b) == sorted(lengths)  # every sample once per epoch
    assert padded(grouped) < 0.75 * padded(shuffled)  # hand check: sorted mega-batches of 400 ≈ no padding
    assert grouped == list(training_loader(cfg, _Lengths(), lengths, 8, seed=3))  # same seed, same batches
    assert grouped != list(training_loader(cfg, _Lengths(), lengths, 8, seed=4))


@pytest.fixture(scope="module")
def tiny_ranker():
    from conftest import tiny_lora_ranker

    return tiny_lora_ranker(["<pad>", "Rose Lipstick", "Plum Nail Polish In A Very Long Bottle", "Coral Blush",
                             "Ruby Gloss"])


def _samples():
    from recsim.protocols.base import Sample

    return [Sample(0, (1,), 2, 1), Sample(1, (2, 3, 4), 1, 3), Sample(2, (3,), 4, 1)]


def test_a_fixed_width_pads_every_batch_to_it_and_changes_no_loss(tiny_ranker):
    r = tiny_ranker.eval()  # no dropout: the two losses are comparable
    plain = r.collate(_samples())
    wide = plain["input_ids"].shape[1] + 13
    static = r.collate(_samples()[:2], width=wide)
    assert static["input_ids"].shape == (2, wide)
    assert static["attention_mask"][:, :13].sum() == 0  # the added columns are left padding
    with torch.no_grad():
        a, b = r.training_step(r.collate(_samples(), width=wide), 0), r.training_step(plain, 0)
    assert float(a) == pytest.approx(float(b), abs=1e-5)
    with pytest.raises(ValueError, match="exceeds the fixed width 4"):
        r.collate(_samples(), width=4)


def test_static_shapes_give_one_width_per_fit(tiny_ranker):
    from types import SimpleNamespace

    from recsim.runner import training_loader

    rec = SimpleNamespace(collate=tiny_ranker.collate, sample_length=tiny_ranker.sample_length)
    longest = max(tiny_ranker.sample_length(s) for s in _samples())
    for static, multiple in ((True, None), (True, 16), (False, None)):
        cfg = OmegaConf.create({"trainer": {"static_shapes": static, "pad_to_multiple_of": multiple}})
        widths = {b["input_ids"].shape[1] for b in training_loader(cfg, rec, _samples(), 1, seed=0)}
        if static:
            m = multiple or 8
            assert widths == {-(-longest // m) * m}  # every batch as wide as the longest sample, rounded up
        else:
            assert len(widths) > 1  # one sample a batch: each its own width


def test_cuda_graph_modes_keep_shapes_static_and_mark_each_step(monkeypatch):
    import torch._dynamo

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    module = torch.nn.Module()
    module.compile_targets = lambda: []
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True, recompile_limit=8):  # restored after
        CompileModel(None).setup(None, module, "fit")
        assert torch._dynamo.config.automatic_dynamic_shapes is True  # the default mode leaves dynamo as it is
        assert module.cuda_graphs is False  # what the step's own passes (EvoRec's L_c pool) read
        CompileModel(None).on_train_batch_start(None, module, None, 0)
        assert marks == []
        graphs = CompileModel("reduce-overhead")
        graphs.setup(None, module, "fit")
        assert module.cuda_graphs is True
        graphs.on_train_batch_start(None, module, None, 0)
        assert torch._dynamo.config.automatic_dynamic_shapes is False and torch._dynamo.config.recompile_limit == 64
        assert marks == [1]
