"""Importing ``fatr_seg.models`` changes nothing outside the package but mmseg's registries.

torch's ``weights_only`` allow-list is process-wide, so it is installed only on request: by
``allow_mmengine_checkpoints()`` (our tools call it) or by ``AllowMMEngineCheckpointsHook`` in a
config's ``custom_hooks``. The checks run in one fresh interpreter, where no other test has
installed anything yet: the import's snapshot first, then the resume (which the snapshot's
check, that importing installs nothing, leaves as fresh).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Snapshot of the process-wide state an import could touch, before and after importing
# fatr_seg.models. mmseg's own modules are imported first, so that what they register is not
# mistaken for ours.
SNAPSHOT = textwrap.dedent("""
    import json, warnings
    import torch
    import mmengine.registry, mmseg.registry
    import mmseg.models, mmseg.engine, mmseg.datasets  # noqa: F401 (mmseg's own registrations)
    from mmengine.registry import DefaultScope, Registry

    def registries():
        out, seen = {}, set()
        stack = [v for m in (mmengine.registry, mmseg.registry) for v in vars(m).values()
                 if isinstance(v, Registry)]
        while stack:
            reg = stack.pop()
            if id(reg) in seen:
                continue
            seen.add(id(reg))
            stack += list(reg._children.values())
            for name, obj in reg._module_dict.items():
                out[f"{reg.scope}:{reg.name}:{name}"] = f"{obj.__module__}.{obj.__qualname__}"
        return out

    def state():
        return dict(
            safe_globals=sorted(repr(g) for g in torch.serialization.get_safe_globals()),
            registries=registries(),
            threads=torch.get_num_threads(),
            warning_filters=[repr(f) for f in warnings.filters],
            default_scope=repr(DefaultScope.get_current_instance()),
        )

    before = state()
    import fatr_seg.models  # noqa: F401
    after = state()
    print("STATE " + json.dumps(dict(before=before, after=after)))
""")


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """The output of the snapshot, then the resume, in one fresh interpreter."""
    work = tmp_path_factory.mktemp("resume")
    return run_python(SNAPSHOT + RESUME.replace("sys.argv[1]", repr(str(work))))


@pytest.mark.slow
def test_import_registers_our_names_and_changes_nothing_else(fresh_process):
    out = fresh_process
    line = next(s for s in out.splitlines() if s.startswith("STATE "))
    state = json.loads(line[len("STATE ") :])
    before, after = state["before"], state["after"]
    assert after["safe_globals"] == before["safe_globals"]
    for key in ("threads", "warning_filters", "default_scope"):
        assert after[key] == before[key], key
    old, new = before["registries"], after["registries"]
    assert {k: new[k] for k in old} == old, "an existing registry entry was replaced or removed"
    added = {k: v for k, v in new.items() if k not in old}
    assert added == {
        "mmseg:model:FATRViT": "fatr_seg.models.backbone.FATRViT",
        "mmseg:model:TimmFATRViT": "fatr_seg.models.timm_backbone.TimmFATRViT",
        "mmseg:model:FATRSegmenterHead": "fatr_seg.models.segmenter_head.FATRSegmenterHead",
        "mmseg:hook:AllowMMEngineCheckpointsHook":
            "fatr_seg.models.safe_globals.AllowMMEngineCheckpointsHook",
        "mmseg:hook:UnreducedCheckpointHook": "fatr_seg.models.hooks.UnreducedCheckpointHook",
        "mmseg:model:DistillEncoderDecoder": "fatr_seg.models.distill.DistillEncoderDecoder",
        "mmseg:model:BatchedSlideEncoderDecoder":
            "fatr_seg.models.segmentor.BatchedSlideEncoderDecoder",
        "mmseg:hook:CompileInferenceHook": "fatr_seg.models.compile.CompileInferenceHook",
        "mmseg:hook:CUDAGraphInferenceHook": "fatr_seg.models.cuda_graph.CUDAGraphInferenceHook",
        "mmseg:dataset:CamVidDataset": "fatr_seg.models.datasets.CamVidDataset",
        "mmseg:transform:LoadCamVidAnnotations":
            "fatr_seg.models.datasets.LoadCamVidAnnotations",
    }  # fmt: skip


# A toy mmengine Runner saves a checkpoint, then resumes from it twice in the same fresh
# process: without the hook (torch refuses the checkpoint), then with it listed in custom_hooks.
RESUME = textwrap.dedent("""
    import pickle, sys
    import torch
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch import nn
    import fatr_seg.models  # noqa: F401

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def forward(self, x, y, mode="loss"):
            return dict(loss=((self.net(x) - y) ** 2).mean())

    data = [dict(x=torch.randn(4), y=torch.randn(1)) for _ in range(8)]

    def runner(work_dir, max_iters, resume_from=None, hooks=()):
        return Runner(
            model=Toy(), work_dir=work_dir, experiment_name=f"run{len(hooks)}{max_iters}",
            train_dataloader=dict(dataset=data, sampler=dict(type="DefaultSampler", seed=0),
                                  batch_size=2, num_workers=0,
                                  collate_fn=dict(type="default_collate")),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-2)),
            train_cfg=dict(by_epoch=False, max_iters=max_iters),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2,
                                               by_epoch=False)),
            custom_hooks=list(hooks), load_from=resume_from, resume=resume_from is not None,
            default_scope="mmseg")

    work = sys.argv[1]
    safe = torch.serialization.get_safe_globals()
    runner(work + "/first", 2).train()
    ckpt = work + "/first/iter_2.pth"
    try:
        runner(work + "/plain", 4, ckpt).train()
        print("RESUMED WITHOUT HOOK")
    except pickle.UnpicklingError:
        print("REFUSED WITHOUT HOOK")
    assert torch.serialization.get_safe_globals() == safe
    resumed = runner(work + "/hooked", 4, ckpt, [dict(type="AllowMMEngineCheckpointsHook")])
    resumed.train()
    print(f"RESUMED WITH HOOK AT {resumed.iter}")
""")


@pytest.mark.slow
def test_resume_needs_the_hook_and_works_with_it(fresh_process):
    out = fresh_process
    assert "REFUSED WITHOUT HOOK" in out
    assert "RESUMED WITH HOOK AT 4" in out
