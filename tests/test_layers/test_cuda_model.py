"""The whole model on a CUDA device: CPU's results, no host synchronisation, one compiled graph,
CUDA-graph replay. Skipped without a CUDA device (CI has none); ``tools/gpu_bench.sh --tests``
runs them on a lent GPU.

* fp32 on CUDA (TF32 off) gives the CPU model's tokens and the same token selection.
* Under bf16 autocast, after a warm-up, the backbone and the whole segmentor run with
  ``torch.cuda.set_sync_debug_mode("error")``: any host read (``.item()``, ``nonzero``, a blocking
  copy to the host) raises, so a pass is the CUDA-side proof of what ``test_host_sync.py`` counts
  on CPU.
* ``torch.compile(fullgraph=True)`` with inductor (Triton kernels) compiles one graph and gives
  eager's results (fp32; under bf16 autocast one graph with eager's shapes).
* The forward is captured in a CUDA graph and replayed on new input with eager's results; a
  capture fails on any synchronisation.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fatr_seg.layers import FATRVisionTransformer, MaskTransformerHead

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# ViT-S/16's width and depth at 256² (256 tokens): the default reduction's layers (4, 7, 10).
VIT = dict(img_size=256, patch_size=16, embed_dims=384, num_layers=12, num_heads=6)
REDUCTIONS = {"none": None, "fatr": dict(method="fatr"), "fatr_paper": dict(method="fatr_paper")}


def build(reduction, compact_output=True, check_finite=True):
    torch.manual_seed(0)
    model = FATRVisionTransformer(**VIT, reduction=reduction, compact_output=compact_output,
                                  check_finite=check_finite).eval()  # fmt: skip
    with torch.no_grad():  # the learned reduction terms away from their identity init
        for name, p in model.named_parameters():
            if name.endswith(("omega1", "omega2", "dc_pos")):
                p.normal_(0, 0.3)
    return model


def inputs(batch=2, size=256, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def as_tensors(out):
    """The tensors of a backbone output (compact outputs or full-grid maps), in order."""
    tensors = []
    for o in out:
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        else:
            tensors += [o.tokens, o.source, o.counts]
    return tensors


def assert_outputs_close(actual, expected, rtol, atol):
    for a, e in zip(as_tensors(actual), as_tensors(expected), strict=True):
        if e.is_floating_point():
            torch.testing.assert_close(a.float().cpu(), e.float().cpu(), rtol=rtol, atol=atol)
        else:  # the token selection: exactly the same
            assert torch.equal(a.cpu(), e.cpu())


@pytest.fixture
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("compact_output", [True, False])
def test_cuda_fp32_matches_cpu(name, compact_output, no_tf32):
    model = build(REDUCTIONS[name], compact_output)
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        actual = model.cuda()(x.cuda())
    assert_outputs_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_bf16_inference_never_syncs(name):
    backbone = build(REDUCTIONS[name]).cuda()
    head = MaskTransformerHead(384, num_classes=150, num_layers=2, num_heads=6, embed_dims=384)
    segmentor = torch.nn.Sequential(backbone, head).cuda().eval()
    x = inputs().cuda()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        segmentor(x)  # warm-up: kernel choices, Triton autotuning, cuBLAS handles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            backbone(x)
            logits = segmentor(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, 150, 16, 16) and logits.isfinite().all()


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_fullgraph_compile_matches_eager(name, no_tf32):
    """fp32 (TF32 off): inductor's fused kernels give eager's tokens and the same selection.

    Not in bf16: there inductor keeps fused intermediates in fp32 where eager rounds each op's
    output to bf16, so scores differ in the last bits and near-tied tokens may swap (on an H200
    44 to 70 % of the compact tokens differed at 2e-2: one changed choice moves every later
    compact token).
    """
    torch._dynamo.reset()
    model = build(REDUCTIONS[name]).cuda()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for seed in (0, 1):
            x = inputs(seed=seed).cuda()
            assert_outputs_close(fn(x), model(x), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1 and counter.op_count > 0
    torch._dynamo.reset()


def test_fullgraph_compile_under_bf16_autocast():
    """bf16 autocast compiles as one graph too, with eager's output shapes and finite values."""
    torch._dynamo.reset()
    model = build(REDUCTIONS["fatr"]).cuda()
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        x = inputs().cuda()
        got, want = as_tensors(fn(x)), as_tensors(model(x))
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.isfinite().all() for t in got if t.is_floating_point())
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["fatr", "fatr_paper"])
def test_fp16_training_step(name):
    """A mixed-precision training step (mmseg's AmpOptimWrapper: fp16 autocast, scaled loss)."""
    model = build(REDUCTIONS[name], compact_output=False).cuda().train()
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", torch.float16):
        loss = model(inputs().cuda())[0].float().square().mean()
    scaler.scale(loss).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("check_finite", [True, False])
def test_cuda_graph_replay_matches_eager(check_finite):
    model = build(REDUCTIONS["fatr"], check_finite=check_finite).cuda()
    static_x = inputs(seed=0).cuda()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        static_x.copy_(inputs(seed=1).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_outputs_close(static_out, model(static_x), rtol=1e-5, atol=1e-5)
