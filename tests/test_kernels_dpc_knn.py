"""DPC-KNN: the reference follows the official clustering, and the Triton twin equals the reference.

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton); grids stay tiny because the interpreter is slow.
"""
import pytest
import torch
import triton

import tokenomy.kernels.dpc_knn as reference
import tokenomy.kernels.dpc_knn_triton as fused
from tests.test_kernels_compile import compile_check_spills
from tokenomy.errors import ShapeError
from tokenomy.kernels import dispatch

if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    raise RuntimeError("no GPU and TRITON_INTERPRET is off: run these tests through tests/conftest.py")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def official_dpc_knn(x, cluster_num, k):
    """Transcription of PPE src/models/chatunivi.py `cluster_dpc_knn` (lines 120-184, no mask), with its random
    density noise left out: returns (centres in score order, cluster index of every token)."""
    batch, n, c = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (c ** 0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[torch.arange(batch)[:, None], index_down].argmin(dim=1)
    idx_batch = torch.arange(batch)[:, None].expand(batch, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(batch, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return index_down, idx_cluster


@pytest.mark.parametrize("batch,n,c,clusters,k", [(1, 30, 16, 14, 5), (2, 45, 24, 21, 5), (3, 20, 7, 4, 3)])
def test_reference_matches_the_official_clustering(batch, n, c, clusters, k):
    x = torch.randn(batch, n, c, generator=torch.Generator().manual_seed(n))
    centres, assign = official_dpc_knn(x, clusters, k)
    result = reference.dpc_knn(x, clusters, k)
    assert torch.equal(result.centres, centres)
    assert torch.equal(result.assign, assign)
    for b in range(batch):  # merged token = mean of its members
        for slot in range(clusters):
            torch.testing.assert_close(result.merged[b, slot], x[b, assign[b] == slot].mean(0))


def test_reference_densities_parents_and_centres_by_hand():
    # two tight pairs and a loner on a line; k = 2 (self + nearest)
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [30.0]])[None]
    result = reference.dpc_knn(x, 3, k=2)
    expected_density = torch.exp(-torch.tensor([1.0, 1.0, 1.0, 1.0, 19.0 ** 2]) / 2)
    torch.testing.assert_close(result.density[0], expected_density)
    # equal densities: the lower index counts as denser, so 0 is the densest and 1's parent is 0
    assert result.parent[0].tolist() == [-1, 0, 1, 2, 3]
    # scores delta * rho: 0 -> 30 rho, 2 -> 9 rho, 1 and 3 -> 1 rho (tie: lower index), the loner 4 -> ~0
    assert result.centres[0].tolist() == [0, 2, 1]
    assert result.assign[0].tolist() == [0, 2, 1, 1, 1]  # the loner joins its nearest centre, 2
    assert result.merged[0, :, 0].tolist() == [0.0, 17.0, 1.0]


def assert_twins_agree(x, clusters, k):
    want = reference.dpc_knn(x, clusters, k)
    got = fused.dpc_knn(x, clusters, k)
    assert torch.equal(got.centres, want.centres)
    assert torch.equal(got.assign, want.assign)
    assert torch.equal(got.parent, want.parent)
    torch.testing.assert_close(got.density, want.density, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.score, want.score, atol=1e-6, rtol=1e-5)
    assert got.merged.dtype == x.dtype
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.merged.float(), want.merged.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("batch,n,c,clusters,k,dtype", [
    (1, 1, 8, 1, 1, torch.float32),       # one token
    (1, 9, 8, 3, 5, torch.float32),       # odd N
    (2, 37, 20, 17, 5, torch.float32),    # channels over one block, N over two distance tiles
    (3, 50, 33, 23, 3, torch.float32),    # odd channels
    (2, 13, 16, 13, 5, torch.float32),    # every token a centre
    (2, 70, 12, 32, 5, torch.float16),    # N over one assignment block
    (1, 21, 40, 10, 4, torch.bfloat16),
])
def test_triton_equals_reference_on_random_shapes(batch, n, c, clusters, k, dtype):
    x = torch.randn(batch, n, c, generator=torch.Generator().manual_seed(n * 3 + c)).to(DEVICE, dtype)
    assert_twins_agree(x, clusters, k)


def test_triton_equals_reference_on_ties():
    # duplicated tokens (equal densities, zero distances), and points equidistant from two centres
    base = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [5.0, 5.0], [5.0, 5.0],
                         [1.0, 0.0], [0.0, 2.0]])
    x = torch.stack([base, base.flip(0)]).to(DEVICE)
    for clusters in (1, 3, 5, 9):
        assert_twins_agree(x, clusters, 2)
    same = torch.ones(1, 11, 4, device=DEVICE)  # all distances 0: index decides everything
    assert_twins_agree(same, 4, 3)
    assert reference.dpc_knn(same, 4, 3).centres[0].tolist() == [0, 1, 2, 3]


def test_dispatch_and_bad_inputs():
    x = torch.randn(1, 8, 4)
    torch.testing.assert_close(dispatch.dpc_knn(x, 3, backend="torch").merged, reference.dpc_knn(x, 3).merged)
    assert torch.equal(dispatch.dpc_knn(x, 3, backend="triton").assign, reference.dpc_knn(x, 3).assign)
    with pytest.raises(ShapeError, match="clusters must be an integer in 1..N=8"):
        reference.dpc_knn(x, 9)
    with pytest.raises(ShapeError, match="k \\(neighbours for the density\\)"):
        fused.dpc_knn(x, 2, k=0)
    with pytest.raises(ShapeError, match="\\[B, N, C\\]"):
        reference.dpc_knn(x[0], 2)


def test_kernels_compile_for_hopper_without_spills():
    spills = compile_check_spills("kernels_compile_check_dpc.py")
    assert set(spills) == {"distance", "density_1024", "parent_1024", f"density_{fused.MAX_TOKENS}",
                           f"parent_{fused.MAX_TOKENS}", "assign", "merge"}
    assert all(value == 0 for value in spills.values()), spills
