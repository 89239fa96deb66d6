"""The precision a run computes in (ademvl/precision.py): the CPU check, `auto`, the trainer's choice,
and the fusion's backward under CPU bf16 autocast against fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ademvl import precision
from ademvl.config import TrainConfig, load_run_config
from ademvl.fusion import VisualMemory
from ademvl.recipes.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ademvl" / "configs" / "tiny.yaml"

# First lines of /proc/cpuinfo (flags shortened): an AVX2-only AMD EPYC, an Intel Xeon with AVX512-BF16,
# a Sapphire Rapids with AMX, an Arm Neoverse V1 with BF16.
AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx f16c fma avx2 sha_ni vaes\n"
INTEL_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
INTEL_AMX = "processor\t: 0\nflags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd aes sha2 crc32 atomics fphp asimdhp bf16 i8mm sve\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


@pytest.mark.parametrize("cpuinfo, expected", [(AMD_AVX2, False), (INTEL_AVX512_BF16, True), (INTEL_AMX, True),
                                               (ARM_BF16, True), (ARM_OLD, False), ("", False)])
def test_cpu_computes_bf16_reads_the_flags(cpuinfo: str, expected: bool) -> None:
    assert precision.cpu_computes_bf16(cpuinfo) is expected


def test_cpu_flags_of_the_first_processor() -> None:
    assert precision.cpu_flags(AMD_AVX2) == {"fpu", "sse", "sse2", "avx", "f16c", "fma", "avx2", "sha_ni", "vaes"}
    assert precision.cpu_flags(AMD_AVX2 + INTEL_AMX) == precision.cpu_flags(AMD_AVX2)


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a GPU or other accelerator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)


@pytest.mark.parametrize("cpu_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_is_bf16_exactly_where_the_cpu_computes_in_it(cpu_only, monkeypatch, cpu_bf16: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda cpuinfo=None: cpu_bf16)
    assert precision.resolve("auto") == expected
    why = "this CPU computes in bf16" if cpu_bf16 else "this CPU has no bf16 instructions"
    assert precision.describe("auto", expected) == f"{'bf16' if cpu_bf16 else 'fp32'} (auto: {why})"


def test_named_settings_hold_on_any_machine(cpu_only) -> None:
    assert [precision.resolve(s, cpu_bf16=True) for s in ("fp32", "no", "bf16", "fp16")] == ["no", "no", "bf16", "fp16"]
    assert [precision.resolve(s, cpu_bf16=False) for s in ("fp32", "bf16")] == ["no", "bf16"]
    assert precision.describe("fp32", "no") == "fp32 (set)"


def test_auto_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve("auto", cpu_bf16=False) == expected


def test_train_config_reads_fp32_and_old_names_and_rejects_others() -> None:
    assert [TrainConfig(mixed_precision=s).mixed_precision for s in ("auto", "fp32", "no", "false", "bf16")] == [
        "auto", "no", "no", "no", "bf16"]
    assert load_run_config(TINY, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"  # YAML's false
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp8': choose auto, fp32 \(or no\), bf16 or fp16"):
        TrainConfig.from_dict({"mixed_precision": "fp8"})


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one process-wide state, mixed precision included: each trainer here its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_trainer_follows_auto_and_records_the_choice(cpu_only, fresh_accelerate, monkeypatch, tmp_path: Path,
                                                     cpu_bf16: bool) -> None:
    """With the CPU check mocked: Accelerate runs the steps in bf16 autocast (or not), the trainable
    weights and AdamW's state stay fp32, and config.yaml, the summary and the log name the choice."""
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda cpuinfo=None: cpu_bf16)
    cfg = load_run_config(TINY, ["--train.output_dir", str(tmp_path), "--train.max_steps", "2",
                                 "--train.num_workers", "0", "--train.save_every", "2"])
    trainer = Trainer(cfg)
    assert trainer.precision == ("bf16" if cpu_bf16 else "no")
    assert trainer.acc.mixed_precision == ("bf16" if cpu_bf16 else "no")
    summary = trainer.fit()
    name = "bf16" if cpu_bf16 else "fp32"
    why = "this CPU computes in bf16" if cpu_bf16 else "this CPU has no bf16 instructions"
    assert (summary["precision"], summary["precision_note"]) == (name, f"{name} (auto: {why})")
    assert (tmp_path / "config.yaml").read_text().endswith(f"# precision: {name} (auto: {why})\n")
    assert load_run_config(tmp_path / "config.yaml").train.mixed_precision == "auto"  # still a loadable config
    assert {p.dtype for p in trainer.trainable} == {torch.float32}
    state = trainer.optimizer.state_dict()["state"]
    assert state and {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}


def three_layers():
    """K, V (2, 40, 32) read by three layers' h_n (2, 9, 32), their output gradients, the leaves, a memory."""
    torch.manual_seed(0)
    k = torch.randn(2, 40, 32, requires_grad=True)
    v = torch.randn(2, 40, 32, requires_grad=True)
    hs = [torch.randn(2, 9, 32, requires_grad=True) for _ in range(3)]
    gs = [torch.randn(2, 9, 32) for _ in range(3)]
    return k, v, hs, gs, [*hs, k, v], VisualMemory(0.1, 0.1, "silu")


def test_fusion_backward_under_cpu_bf16_autocast_matches_fp32() -> None:
    """VisualMemory as the model calls it (three layers reading one act(K), V; with and without the
    MLP output as residual) under torch.autocast("cpu", bfloat16): the output is bf16, the gradients
    reach the fp32 leaves in fp32, and they are fp32's to bf16's precision (relative error < 2%)."""
    k, v, hs, gs, leaves, memory = three_layers()

    def run(autocast: bool) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), memory.holding(k, v):
            outs = [memory(hs[0]), memory(hs[1], residual=hs[1] * 2), memory(hs[2])]
        return outs, torch.autograd.grad(outs, leaves, gs)

    outs16, grads16 = run(True)
    outs32, grads32 = run(False)
    assert {o.dtype for o in outs16} == {torch.bfloat16} and {o.dtype for o in outs32} == {torch.float32}
    assert [g.dtype for g in grads16] == [torch.float32] * 5
    for a, b in zip(outs16, outs32):
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2
    for a, b in zip(grads16, grads32):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("setting, autocast_on", [("fp32", False), ("bf16", True)])
def test_generation_runs_in_the_precision_asked_for(setting: str, autocast_on: bool) -> None:
    """`ademvl eval --precision`: every LLM forward of the generation sees bf16 autocast, or none."""
    from ademvl.recipes.evaluate import generate_texts

    from .conftest import samples, tiny_model

    model = tiny_model()
    seen: list[bool] = []
    model.llm.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    texts = generate_texts(model, samples(), batch_size=3, precision=setting, max_new_tokens=3)
    assert len(texts) == 3 and len(seen) == 3 and set(seen) == {autocast_on}  # prefill and two cached steps


def test_under_autocast_the_memory_casts_once_and_sums_dk_dv_in_place() -> None:
    """Training under autocast: VisualMemory casts act(K) and V to bf16 once per forward and ties every
    layer to those casts (dK, dV summed in one fp32 buffer each), instead of each layer casting its own
    copy for autograd to sum. The outputs and dh are the per-layer path's exactly; dK and dV differ
    only by rounding the sum to bf16 once (under 2^-8 relative) instead of every term."""
    from ademvl.fusion import fuse, qk_activation

    k, v, hs, gs, leaves, memory = three_layers()
    with torch.autocast("cpu", dtype=torch.bfloat16), memory.holding(k, v):
        assert memory.keys.dtype == memory.values.dtype == torch.bfloat16 and memory._tie is not None
        tied_outs = [memory(hs[0]), memory(hs[1], residual=hs[1] * 2), memory(hs[2])]
        tied = torch.autograd.grad(tied_outs, leaves, gs)
        k_act = qk_activation(k, "silu")  # fp32: every layer casts it (and V) again
        outs = [fuse(hs[0], k_act, v, 0.1, 0.1, "silu"), fuse(hs[1], k_act, v, 0.1, 0.1, "silu", residual=hs[1] * 2),
                fuse(hs[2], k_act, v, 0.1, 0.1, "silu")]
        per_layer = torch.autograd.grad(outs, leaves, gs)
    assert all(torch.equal(a, b) for a, b in zip(tied_outs, outs))
    assert all(torch.equal(a, b) for a, b in zip(tied[:3], per_layer[:3]))
    for a, b in zip(tied[3:], per_layer[3:]):
        assert a.dtype == torch.float32 and 0 < ((a - b).norm() / b.norm()).item() < 2**-8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), memory.holding(k, v):
        assert memory.keys.dtype == torch.float32 and memory._tie is None  # inference: as held, no buffers


def test_a_second_trainer_in_one_process_may_ask_another_precision(cpu_only, tmp_path: Path) -> None:
    """Accelerate keeps one mixed precision per process; train() from Python twice (bf16, then fp32, as a
    GPU machine's test run did: auto there is bf16) must not be refused."""
    def trainer(setting: str) -> Trainer:
        return Trainer(load_run_config(TINY, ["--train.output_dir", str(tmp_path / setting), "--train.max_steps", "1",
                                              "--train.num_workers", "0", "--train.mixed_precision", setting]))

    assert trainer("bf16").acc.mixed_precision == "bf16"
    assert trainer("fp32").acc.mixed_precision == "no"
