"""Memory-lean soft reconstruction: same values and gradients as plain autograd, nothing saved."""

import pytest
import torch
from torch import nn

from vq4dit.layers import VQLinear
from vq4dit.vq_config import VQConfig
from vq4dit.soft import candidate_ratios, ratio_regularizer, vq_weight


def reference_weight(layer: VQLinear) -> torch.Tensor:
    """The plain-autograd reconstruction (paper Eq. 7): gather, softmax, einsum, index_copy."""
    flat = layer.codebook[layer.codes.long()]
    if layer.num_soft:
        ratios = torch.softmax(layer.candidate_logits.float(), dim=1)
        gathered = layer.codebook[layer.candidates.long()]  # [S, n, d]
        mixed = torch.einsum("sn,snd->sd", ratios, gathered)
        flat = flat.index_copy(0, layer.soft_rows.long(), mixed)
    return flat.reshape(layer.out_features, layer.in_features)


def make_layer(state: str, n: int = 3) -> VQLinear:
    torch.manual_seed(0)
    layer = VQLinear.from_linear(nn.Linear(64, 40), VQConfig(codebook_size=16, subvector_dim=4, num_candidates=n))
    layer.candidate_logits.data = torch.randn_like(layer.candidate_logits) * 2
    if state in ("partly hard", "pruned"):
        layer.candidate_logits.data[::3, 0] = 20.0
        layer.harden_rows_(0.99)
    if state == "pruned":
        layer.candidate_logits.data[::2, 2] = -12.0
        layer.prune_candidates_(0.01)
        assert torch.isinf(layer.candidate_logits).any()
    if state == "hard":
        layer.finalize_()
    layer.codebook.requires_grad_(True)
    layer.candidate_logits.requires_grad_(True)
    return layer


@pytest.mark.parametrize("state, n", [("all soft", 2), ("all soft", 3), ("partly hard", 2), ("pruned", 3), ("hard", 2)])
def test_vq_weight_matches_plain_autograd(state, n):
    layer = make_layer(state, n)
    upstream = torch.randn(layer.out_features, layer.in_features)
    grads = []
    for build in (layer.weight, lambda: reference_weight(layer)):
        layer.zero_grad(set_to_none=True)
        weight = build()
        (weight * upstream).sum().backward()
        logits_grad = layer.candidate_logits.grad
        grads.append((weight.detach(), layer.codebook.grad.clone(), None if logits_grad is None else logits_grad.clone()))
    (w_new, cb_new, lg_new), (w_ref, cb_ref, lg_ref) = grads
    assert torch.allclose(w_new, w_ref, atol=1e-6)
    assert torch.allclose(cb_new, cb_ref, atol=1e-5)
    if layer.num_soft:
        assert torch.allclose(lg_new, lg_ref, atol=1e-5) and torch.isfinite(lg_new).all()


def test_one_hot_soft_rows_reproduce_codewords_exactly():
    layer = make_layer("all soft")
    winner = torch.randint(0, layer.active_candidates, (layer.num_soft,))
    layer.candidate_logits.data = torch.full_like(layer.candidate_logits, -1e4).scatter_(1, winner[:, None], 1e4)
    chosen = layer.candidates.long().gather(1, winner[:, None]).squeeze(1)
    expected = layer.codebook.detach()[chosen].reshape(layer.out_features, layer.in_features)
    assert torch.equal(layer.weight().detach(), expected)


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes autograd saves during ``fn()`` outside the storages of ``exclude``."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("state", ["all soft", "partly hard", "hard"])
def test_soft_weight_saves_nothing_but_the_layer_itself(state):
    layer = make_layer(state)
    own = [*layer.parameters(), *layer.buffers()]
    nbytes, weight = saved_bytes(layer.weight, own)
    assert nbytes == 0
    nbytes_ref, _ = saved_bytes(lambda: reference_weight(layer), own)
    if layer.num_soft:
        assert nbytes_ref > 10 * weight.numel()  # plain autograd: gathered [S, n, d], ratios, int64 indices


@pytest.mark.parametrize("kind, n", [("official", 2), ("official", 3), ("paper", 2), ("paper", 3)])
def test_ratio_regularizer_gradient_and_memory(kind, n):
    torch.manual_seed(0)
    logits = torch.randn(500, n, requires_grad=True)
    reference = {"official": lambda r: n * (r * (1 - r)).mean(), "paper": lambda r: (1 - (2 * r - 1).abs()).mean()}[kind]
    nbytes, value = saved_bytes(lambda: ratio_regularizer(candidate_ratios(logits), kind), [logits])
    (grad,) = torch.autograd.grad(value, logits)
    expected_value = reference(torch.softmax(logits, dim=1))
    (expected_grad,) = torch.autograd.grad(expected_value, logits)
    assert torch.allclose(value.detach(), expected_value.detach(), rtol=1e-6, atol=0)
    assert torch.allclose(grad, expected_grad, atol=1e-7)
    assert nbytes <= logits.numel() * 4  # only the ratios themselves (the softmax output)


def test_bf16_autocast_keeps_the_mix_in_float32():
    layer = make_layer("partly hard")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.weight()
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, reference_weight(layer), atol=1e-6)


def test_vq_weight_functional_form():
    layer = make_layer("partly hard")
    flat = vq_weight(layer.codebook, layer.codes, layer.soft_rows, layer.candidates, layer.candidate_logits)
    assert flat.shape == (layer.num_subvectors, layer.config.subvector_dim)
    assert torch.equal(flat.view(layer.out_features, layer.in_features), layer.weight())


def test_student_shares_frozen_tensors_with_the_teacher():
    from vq4dit.engine import build_student
    from vq4dit.models import load_dit
    from vq4dit.quantize import vq_layers

    teacher = load_dit("tiny")
    student = build_student(teacher, VQConfig.from_bits(2, kmeans_iters=0), progress=False)
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    layers = vq_layers(student)
    vq_params = {id(p) for layer in layers.values() for p in layer.parameters()}
    others = [p for p in student.parameters() if id(p) not in vq_params]
    assert others and all(p.data_ptr() in teacher_ptrs for p in others)
    assert not any(p.data_ptr() in teacher_ptrs for layer in layers.values() for p in layer.parameters())
    assert all(type(m).__name__ == "Linear" for n, m in teacher.named_modules() if n in layers)


def test_bf16_teacher_keeps_a_float32_student_and_accepts_float32_inputs():
    import copy

    from vq4dit.engine import CalibrationConfig, Calibrator
    from vq4dit.lightning import CalibrationModule
    from vq4dit.models import load_dit
    from vq4dit.sampling import NULL_CLASS

    teacher = load_dit("tiny")
    fp32_teacher = copy.deepcopy(teacher)
    engine = Calibrator.build(
        teacher, VQConfig.from_bits(2, kmeans_iters=0), CalibrationConfig(teacher_dtype="bfloat16"), progress=False
    )
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.student.parameters()} == {torch.float32}
    config = teacher.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size)
    batch = (x, torch.tensor([10, 500]), torch.tensor([3, NULL_CLASS]))
    block_mse, output_mse = engine.block_losses(batch)  # float32 batch into the bf16 teacher
    assert torch.isfinite(block_mse).all() and torch.isfinite(output_mse)
    with torch.no_grad():
        out_bf16 = teacher(x, timestep=batch[1], class_labels=batch[2]).sample.float()
        out_fp32 = fp32_teacher(x, timestep=batch[1], class_labels=batch[2]).sample
    assert (out_bf16 - out_fp32).norm() / out_fp32.norm() < 2e-2  # bf16 rounding only
    with pytest.raises(ValueError, match="teacher_dtype"):
        CalibrationConfig(teacher_dtype="float16")
    with pytest.raises(ValueError, match="teacher_dtype"):
        CalibrationModule(model="tiny", calibration={"teacher_dtype": "float16"})


@pytest.mark.parametrize("kind, n", [("official", 2), ("official", 3), ("paper", 2), ("paper", 3)])
def test_logit_regularizer_equals_ratio_regularizer_and_saves_nothing(kind, n):
    from vq4dit.soft import logit_regularizer

    torch.manual_seed(0)
    logits = torch.randn(400, n) * 2
    logits[::7, -1] = float("-inf")  # pruned candidates
    logits.requires_grad_(True)
    nbytes, value = saved_bytes(lambda: logit_regularizer(logits, kind), [logits])
    (grad,) = torch.autograd.grad(value, logits)
    expected = ratio_regularizer(candidate_ratios(logits), kind)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert nbytes == 0
    assert torch.equal(value.detach(), expected.detach())
    assert torch.allclose(grad, expected_grad, atol=1e-7) and torch.isfinite(grad).all()


def test_gradients_are_freed_after_every_optimizer_step(tmp_path):
    """The previous step's gradients must not be alive during the next forward (the peak)."""
    import pytorch_lightning as pl

    from train import cli_main

    class GradientWatch(pl.Callback):
        def __init__(self) -> None:
            self.alive_at_forward, self.seen_after_backward = [], 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.alive_at_forward.append(sum(p.grad is not None for p in pl_module.parameters()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.seen_after_backward += any(p.grad is not None and p.grad.abs().sum() > 0 for p in pl_module.parameters())

    watch = GradientWatch()
    cli = cli_main([
        "--config", "configs/demo.yaml", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.export.dir={tmp_path / 'packed'}",
        "--model.model=tiny", "--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_classes=1000",
        "--data.num_trajectories=1", "--data.num_steps=8", "--data.val_trajectories=0", "--trainer.max_epochs=1",
        "--model.allocation.enabled=false",
    ], run=False)
    cli.trainer.callbacks.append(watch)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(watch.alive_at_forward) == cli.trainer.global_step > 1
    assert watch.seen_after_backward == cli.trainer.global_step  # real gradients reach the optimizer
    assert watch.alive_at_forward == [0] * cli.trainer.global_step


def test_student_builds_under_a_foreign_default_device():
    """Lightning runs configure_model inside ``with torch.device(root_device)``: every tensor the
    k-means initialisation makes must still be placed explicitly (a CPU generator with a CUDA
    default device fails). ``meta`` stands in for ``cuda`` here."""
    from vq4dit.lightning import CalibrationModule

    module = CalibrationModule(model="tiny", vq={"bits": 2, "kmeans_iters": 2}, recipe="paper")  # no activation statistics
    with torch.device("meta"):
        module.configure_model()
    assert {t.device.type for t in (*module.student.parameters(), *module.student.buffers())} == {"cpu"}
    layer = next(iter(module.engine.layers.values()))
    assert layer.num_soft and torch.isfinite(layer.codebook).all()


def test_memory_benchmark_counts_the_statistics_of_the_default_recipe():
    """benchmarks/memory.py: the build estimate holds the fp32 teacher and the full E[x x^T]; the
    engine's E[x^2] lives in host RAM and stays out of the GPU peak."""
    from benchmarks.memory import GB, build_estimate, estimate_peak, gpu_estimate

    sizes = dict(precision="bf16-mixed", model_batch=2, num_blocks=2, saved_activations=GB, tokens=4, hidden=8,
                 teacher_params=10**9, student_other_bytes=0, student_other_shared_bytes=0, codebooks=0, biases=0,
                 codes=0, soft_rows=0, candidates=0, candidate_logits=0, saved_ratios=0, saved_weights=0)
    peak = estimate_peak(gpu_estimate(sizes))
    with_moments = {**sizes, "full_moments": 3 * GB, "diagonal_moments": GB}
    assert estimate_peak(gpu_estimate(with_moments)) == pytest.approx(peak)  # host row not in the GPU peak
    assert build_estimate(sizes) == pytest.approx(4.0) and build_estimate(with_moments) == pytest.approx(7.0)
