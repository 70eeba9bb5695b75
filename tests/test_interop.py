"""load_spconv_state_dict: PyTorch keys and layouts, errors that name every bad key, and (spconv
oracle) the reference networks built in spconv 2.3.8 with random weights and BatchNorm statistics,
transferred, giving the same eval outputs on a real scan."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import models
from jsparse import nn as spnn
from jsparse.interop import load_spconv_state_dict, spconv_key
from jsparse.utils import PointToVoxel, mean_voxel_features
from sparse_data import assert_same_as_spconv, random_tensor


def _sequential():
  return spnn.SparseSequential(
    spnn.SubMConv3d(4, 8, 3, bias=True, indice_key="s", rngs=nnx.Rngs(0)),
    spnn.BatchNorm(8, rngs=nnx.Rngs(0)),
    nnx.relu,
    spnn.SparseConv3d(8, 16, (3, 1, 1), 2, 0, bias=False, rngs=nnx.Rngs(1)),
    nnx.Linear(16, 3, rngs=nnx.Rngs(2)),
  )


def _sequential_state_dict(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """What spconv's SparseSequential(SubMConv3d, BatchNorm1d, ReLU, SparseConv3d, Linear) saves."""
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  return {
    "0.weight": f32(8, 3, 3, 3, 4), "0.bias": f32(8),
    "1.weight": f32(8), "1.bias": f32(8), "1.running_mean": f32(8), "1.running_var": 1 + f32(8) ** 2,
    "1.num_batches_tracked": np.array(7),
    "3.weight": f32(16, 3, 1, 1, 8),
    "4.weight": f32(3, 16), "4.bias": f32(3),
  }  # fmt: skip


def test_sequential_by_position_with_pytorch_layouts():
  net, state = _sequential(), _sequential_state_dict(np.random.default_rng(0))
  load_spconv_state_dict(net, state)
  conv, bn, _, down, linear = net.layers
  np.testing.assert_array_equal(conv.kernel[...], np.moveaxis(state["0.weight"], 0, -1))
  np.testing.assert_array_equal(conv.bias[...], state["0.bias"])
  np.testing.assert_array_equal(bn.scale[...], state["1.weight"])
  np.testing.assert_array_equal(bn.bias[...], state["1.bias"])
  np.testing.assert_array_equal(bn.mean[...], state["1.running_mean"])
  np.testing.assert_array_equal(bn.var[...], state["1.running_var"])
  np.testing.assert_array_equal(down.kernel[...], np.moveaxis(state["3.weight"], 0, -1))
  np.testing.assert_array_equal(linear.kernel[...], state["4.weight"].T)
  np.testing.assert_array_equal(linear.bias[...], state["4.bias"])


def test_single_tap_convs_read_spconvs_memory_order():
  # spconv 2.3.8 computes these as features @ weight.view(in, out) (its conv1x1 path)
  # spconv ignores a SubM layer's stride, and so does the conv1x1 test (SubMConv3d(2, 3, 1, 2) here)
  net = spnn.SparseSequential(spnn.SubMConv3d(2, 3, 1, 2, bias=False, rngs=nnx.Rngs(0)))
  weight = np.arange(6, dtype=np.float32).reshape(3, 1, 1, 1, 2)
  load_spconv_state_dict(net, {"0.weight": weight})
  np.testing.assert_array_equal(net.layers[0].kernel[...], weight.reshape(1, 1, 1, 2, 3))


def test_every_bad_key_is_named_and_nothing_is_loaded():
  net = _sequential()
  before = np.asarray(net.layers[0].kernel[...]).copy()
  state = _sequential_state_dict(np.random.default_rng(0))
  del state["1.running_var"], state["4.bias"]
  state["2.weight"] = np.zeros(3, np.float32)
  state["3.weight"] = np.zeros((16, 3, 3, 3, 8), np.float32)
  message = (
    r"1 keys match no parameter of the model: 2.weight; 2 parameters have no key: 1.running_var, "
    r"4.bias; 3.weight: shape \(16, 3, 3, 3, 8\) gives \(3, 3, 3, 8, 16\) in jsparse's layout, the "
    r"model's SparseConv3d.kernel is \(3, 1, 1, 8, 16\)"
  )
  with pytest.raises(ValueError, match=message):
    load_spconv_state_dict(net, state)
  np.testing.assert_array_equal(net.layers[0].kernel[...], before)


def test_model_keys_are_openpcdets():
  keys = set(spconv_key(models.VoxelResBackBone8x(5, rngs=nnx.Rngs(0))).values())
  expected = (
    "conv_input.0.weight", "conv_input.1.running_mean", "conv2.0.1.running_mean", "conv1.0.conv1.weight",
    "conv1.0.conv1.bias", "conv1.1.bn2.running_var", "conv_out.0.weight",
  )  # fmt: skip
  for key in expected:
    assert key in keys, key


# ---- the spconv oracle ----------------------------------------------------------------------


def _kitti(scans, voxel_size, coors_range):
  points = np.fromfile(scans / "kitti_000008.bin", np.float32).reshape(-1, 4)
  gen = PointToVoxel(voxel_size, coors_range, 4, 60_000, 10)
  voxels, coords, counts, _ = gen.generate_voxel_with_id(points)
  features = np.asarray(mean_voxel_features(voxels, counts))
  indices = np.c_[np.zeros(len(coords), np.int32), np.asarray(coords)].astype(np.int32)
  return features, indices, gen.grid_size_xyz


def _randomize_batch_norms(torch, net, seed: int) -> None:
  """Random BatchNorm scales, biases and running statistics (defaults would hide a mix-up), and
  BatchNorms in eval mode; the convolutions stay in train mode, which spconv's CPU build needs."""
  generator = torch.Generator().manual_seed(seed)
  net.train()
  for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm1d):
      c = module.num_features
      module.weight.copy_(0.5 + torch.rand(c, generator=generator))
      module.bias.copy_(0.1 * torch.randn(c, generator=generator))
      module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
      module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
      module.eval()


@pytest.mark.spconv
@pytest.mark.slow
@pytest.mark.parametrize("name", ["VoxelBackBone8x", "VoxelResBackBone8x", "MinkUNet"])
def test_spconv_networks_transferred_give_the_same_outputs(spconv, scans, name):
  import _spconv_models

  torch, sp = spconv
  torch.manual_seed(0)
  reference = _spconv_models.build(name, 4, 19)
  _randomize_batch_norms(torch, reference, seed=1)
  if name == "MinkUNet":
    features, indices, grid = _kitti(scans, (0.1, 0.1, 0.1), (0, -40, -3, 70.4, 40, 1))
    shape, model = tuple(grid[::-1]), models.MinkUNet(4, 19, rngs=nnx.Rngs(0))
  else:
    features, indices, grid = _kitti(scans, (0.1, 0.1, 0.1), (0, -40, -3, 70.4, 40, 1))
    shape = models.VoxelBackBone8x.sparse_shape(grid)
    model = getattr(models, name)(4, rngs=nnx.Rngs(0))
  load_spconv_state_dict(model, reference.state_dict())  # torch tensors
  model.eval()

  expected = reference(sp.SparseConvTensor(torch.tensor(features), torch.tensor(indices), list(shape), 1))
  x = jsparse.SparseConvTensor(features, indices, shape, 1)
  y = model(x) if name == "MinkUNet" else model(x)[0]
  scale = float(np.abs(expected.features.numpy()).max())
  assert scale > 0.1  # a network that outputs ~0 would compare equal by accident
  assert_same_as_spconv(y, expected, atol=2e-4 * scale)


def test_loaded_model_keeps_padding_rows_zero():
  net = _sequential()
  load_spconv_state_dict(net, _sequential_state_dict(np.random.default_rng(1)))
  net.eval()
  for padding_rows in (0, 5, 40):
    x = random_tensor(np.random.default_rng(2), 1, (6, 6, 6), 4, 30, padding_rows=padding_rows)
    y = net(x)
    assert np.all(np.asarray(y.features)[~np.asarray(y.mask)] == 0)
