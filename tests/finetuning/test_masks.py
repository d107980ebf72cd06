import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.finetuning.masks import SparseMasks, plain_name, pruned_weights


def _pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0.0  # 50% of the first layer
    return model


def test_masks_zero_grads_and_weights_of_pruned_entries_only():
    model = _pruned_mlp()
    expected = pruned_weights(model)
    assert expected == {"0.weight": 32}  # the dense layer has no zeros, so no mask
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    masks = SparseMasks.build(model, optimizer, expected, sharded=False)
    model(torch.randn(5, 8)).sum().backward()
    assert model[0].weight.grad[:, ::2].abs().sum() > 0  # without the mask, pruned entries would move
    masks.zero_grads()
    assert (model[0].weight.grad[:, ::2] == 0).all() and (model[0].weight.grad[:, 1::2] != 0).any()
    optimizer.step()
    masks.apply()
    assert masks.violations() == 0 and masks.zeros() == 32


def test_wrapper_names_are_stripped():
    assert plain_name("module._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.weight") == (
        "model.layers.0.mlp.weight"
    )


def test_a_mask_that_does_not_match_its_weight_is_refused():
    model = _pruned_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(SparseftError, match="does not match"):
        SparseMasks.build(model, optimizer, {"0.weight": 31}, sharded=False)


FSDP2_DRIVER = """
import sys
import torch, torch.distributed as dist, transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from sparseft.finetuning.masks import SparseMasks, pruned_weights
from sparseft.demo.tiny import tiny_config

dist.init_process_group("gloo")
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=128))
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.ndim == 2 and ".layers." in name:
            p[p.abs() < p.abs().median()] = 0.0
expected = pruned_weights(model)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in model.model.layers:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
masks = SparseMasks.build(model, optimizer, expected, sharded=True)
assert type(masks.params[0]).__name__ == "DTensor"
zeros = torch.tensor([masks.zeros()])
dist.all_reduce(zeros)
assert int(zeros) == sum(expected.values()), (int(zeros), sum(expected.values()))
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
before = [m.clone() for m in masks.keep]
for _ in range(3):
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    masks.zero_grads()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    masks.apply()
    optimizer.zero_grad()
bad = torch.tensor([masks.violations()])
dist.all_reduce(bad)
kept = sum(int((p.to_local()[m] != 0).sum()) for p, m in zip(masks.params, masks.keep))
result = [int(bad), kept > 0, all(torch.equal(a, b) for a, b in zip(before, masks.keep))]

# The optimizer's shards survive a checkpoint read with weights_only=True and keep training.
from sparseft.finetuning.masks import local
from sparseft.finetuning.checkpoints import load_local_optimizer_state, local_optimizer_state
path = sys.argv[1] + f"/opt-{dist.get_rank()}.pt"
torch.save(local_optimizer_state(optimizer), path)
fresh = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
load_local_optimizer_state(fresh, torch.load(path, weights_only=True))
same = all(
    torch.equal(local(a[k]), local(b[k]))
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values())
    for k in a
)
model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
fresh.step()
# One file per rank: the two processes share one stdout, where their lines can interleave.
with open(sys.argv[1] + f"/result-{dist.get_rank()}.txt", "w") as f:
    f.write(repr(result + [same]))
dist.destroy_process_group()
"""


def test_masks_act_on_fsdp2_shards(tmp_path):
    """Under FSDP2 each process holds a DTensor shard; the masks must be built from and act on those shards."""
    driver = tmp_path / "fsdp2.py"
    driver.write_text(FSDP2_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29562", str(driver), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # no pruned entry moved, kept entries did, the masks are unchanged, the optimizer state round-trips
    for rank in range(2):
        assert (tmp_path / f"result-{rank}.txt").read_text() == "[0, True, True, True]"
