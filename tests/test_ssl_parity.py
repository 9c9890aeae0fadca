"""tlkd pretrain against the reference code: SimCLR's NT-Xent, value and gradient, in one
process and with negatives gathered across 2 processes (gloo), against a transcription of
google-research/simclr, tf2/objective.py (add_contrastive_loss, tpu_cross_replica_concat)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from conftest import tlkd_env

from tlkd.ssl.simclr import nt_xent

# --- transcription of google-research/simclr, tf2/objective.py, in torch ------------------
LARGE_NUM = 1e9


def _softmax_cross_entropy_with_logits(labels, logits):
    return -(labels * F.log_softmax(logits, dim=-1)).sum(-1)


def ref_add_contrastive_loss(hidden, hidden_norm=True, temperature=1.0, replicas=None):
    """add_contrastive_loss. ``replicas`` = (the replicas' hidden tensors, this replica's
    index) stands for ``strategy``: tpu_cross_replica_concat is then the concatenation of
    every replica's hidden1 (hidden2), through which gradients flow (TF's cross-replica
    all-reduce is differentiable)."""
    if hidden_norm:
        hidden = F.normalize(hidden, dim=-1)
    hidden1, hidden2 = torch.split(hidden, hidden.shape[0] // 2, 0)
    batch_size = hidden1.shape[0]
    if replicas is not None:
        all_hidden, replica_id = replicas
        normed = [F.normalize(h, dim=-1) if hidden_norm else h for h in all_hidden]
        hidden1_large = torch.cat([torch.split(h, h.shape[0] // 2, 0)[0] for h in normed])
        hidden2_large = torch.cat([torch.split(h, h.shape[0] // 2, 0)[1] for h in normed])
        enlarged_batch_size = hidden1_large.shape[0]
        labels_idx = torch.arange(batch_size) + replica_id * batch_size
        labels = F.one_hot(labels_idx, enlarged_batch_size * 2).float()
        masks = F.one_hot(labels_idx, enlarged_batch_size).float()
    else:
        hidden1_large, hidden2_large = hidden1, hidden2
        labels = F.one_hot(torch.arange(batch_size), batch_size * 2).float()
        masks = F.one_hot(torch.arange(batch_size), batch_size).float()
    logits_aa = hidden1 @ hidden1_large.T / temperature
    logits_aa = logits_aa - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature
    logits_bb = logits_bb - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature
    loss_a = _softmax_cross_entropy_with_logits(labels, torch.cat([logits_ab, logits_aa], 1))
    loss_b = _softmax_cross_entropy_with_logits(labels, torch.cat([logits_ba, logits_bb], 1))
    return (loss_a + loss_b).mean()


def _local(z: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Replica ``rank``'s [views 1; views 2] of the global [views 1; views 2]."""
    v1, v2 = z.chunk(2)
    n = len(v1) // world
    return torch.cat([v1[rank * n : (rank + 1) * n], v2[rank * n : (rank + 1) * n]])


# ------------------------------------------------------------------------------------------


def test_nt_xent_parity_with_simclr_single_process():
    """google-research/simclr tf2/objective.py add_contrastive_loss (strategy None): the
    a->b and b->a cross-entropies summed, so twice the mean over the 2N views."""
    torch.manual_seed(0)
    z = torch.randn(2 * 7, 5, dtype=torch.float64) * 3
    for t in (0.1, 0.5):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        ours, ref = nt_xent(a, t), ref_add_contrastive_loss(b, temperature=t)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        # twice the mean cross-entropy over the 2N rows (what tlkd computed before)
        h = F.normalize(z.float(), dim=1)
        sim = (h @ h.T / t).fill_diagonal_(float("-inf"))
        partner = torch.cat([torch.arange(7, 14), torch.arange(0, 7)])
        torch.testing.assert_close(ours, 2 * F.cross_entropy(sim, partner))


SCRIPT = """
import json, sys
import torch
from tlkd.engine import distributed
from tlkd.ssl.simclr import nt_xent

info = distributed.init_from_env("cpu")
torch.manual_seed(0)
z = torch.randn(2 * 6, 5) * 3                    # the global [views 1; views 2], 6 pairs
v1, v2 = z.chunk(2)
n = 6 // info.world
local = torch.cat([v1[info.rank * n:(info.rank + 1) * n], v2[info.rank * n:(info.rank + 1) * n]])
local.requires_grad_()
loss = nt_xent(local, 0.2)
loss.backward()
with open(sys.argv[1] + f"/rank{info.rank}.json", "w") as f:
    json.dump({"loss": loss.item(), "grad": local.grad.tolist()}, f)
distributed.shutdown()
"""


def test_nt_xent_parity_with_simclr_two_processes(tmp_path):
    """google-research/simclr tf2/objective.py with a strategy of 2 replicas: each process's
    anchors against every process's views (tpu_cross_replica_concat), gradients flowing
    back to the process that made them. Each rank's loss is its replica's; the gradient
    averaged as DistributedDataParallel does is the replicas' mean loss's, and equals one
    process's on the whole batch."""
    script = tmp_path / "ntxent_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(script), str(tmp_path),
        ],
        cwd=tmp_path, env=tlkd_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    torch.manual_seed(0)
    z = torch.randn(2 * 6, 5) * 3
    full = z.clone().requires_grad_()
    parts = [_local(full, r, 2) for r in range(2)]
    ref = [ref_add_contrastive_loss(parts[r], temperature=0.2, replicas=(parts, r)) for r in (0, 1)]
    for r in range(2):
        assert abs(ranks[r]["loss"] - ref[r].item()) < 1e-5
    # run.py: loss / num_replicas_in_sync, gradients summed over replicas (DDP: averaged)
    (sum(ref) / 2).backward()
    grad = torch.zeros_like(z)
    v = grad.view(2, 6, 5)  # [views 1; views 2]
    for r in range(2):
        g = torch.tensor(ranks[r]["grad"]) / 2
        v[0, r * 3 : (r + 1) * 3], v[1, r * 3 : (r + 1) * 3] = g[:3], g[3:]
    torch.testing.assert_close(grad, full.grad, rtol=1e-4, atol=1e-6)
    # the same as one process on the global batch
    single = z.clone().requires_grad_()
    loss = nt_xent(single, 0.2)
    loss.backward()
    assert abs(loss.item() - (ranks[0]["loss"] + ranks[1]["loss"]) / 2) < 1e-5
    torch.testing.assert_close(grad, single.grad, rtol=1e-4, atol=1e-6)
