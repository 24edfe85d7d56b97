import pytest
import torch

from u2zoo.errors import ConfigError
from u2zoo.zoo.archs import ARCHS, build_arch, count_macs, count_params

from conftest import REAL_WEIGHTS


def test_parameter_counts_match_the_paper_and_the_lite_target():
    assert count_params(build_arch("u2net")) == 44_009_869  # 44.0M, as published
    assert count_params(build_arch("u2netp")) == 1_131_181  # 1.13M, as published
    lite = count_params(build_arch("u2net-lite"))
    assert abs(lite - 4.7e6) / 4.7e6 <= 0.03, lite


def test_lite_uses_depthwise_separable_convs_only():
    from torch import nn

    convs = [m for m in build_arch("u2net-lite").modules() if isinstance(m, nn.Conv2d)]
    three_by_three = [m for m in convs if m.kernel_size == (3, 3)]
    # every 3×3 inside the RSU blocks is depthwise; only the six side heads stay dense
    dense = [m for m in three_by_three if m.groups == 1]
    assert len(dense) == 6 and all(m.out_channels == 1 for m in dense)


def test_official_key_names_and_shapes_of_u2net():
    state = build_arch("u2net").state_dict()
    assert state["stage1.rebnconvin.conv_s1.weight"].shape == (64, 3, 3, 3)
    assert state["stage4d.rebnconvin.conv_s1.weight"].shape == (256, 1024, 3, 3)
    assert state["stage5d.rebnconv4.conv_s1.weight"].shape == (256, 256, 3, 3)
    assert state["stage1d.rebnconv7.bn_s1.running_var"].shape == (16,)
    assert state["side3.weight"].shape == (1, 128, 3, 3)
    assert state["outconv.weight"].shape == (1, 6, 1, 1)
    assert len(state) == 798  # same topology as U2NETP, whose official checkpoint has 798 keys


@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="../shared weights not present")
def test_official_u2netp_checkpoint_loads_strictly():
    state = torch.load(REAL_WEIGHTS, weights_only=True)
    model = build_arch("u2netp")
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_deploy_mode_returns_the_fused_map_of_training_mode(name):
    if name == "u2net":
        pytest.skip("same code path as u2netp; covered by the slow ONNX round trip")
    torch.manual_seed(0)
    model = build_arch(name)
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        seven = model(x)
        model.deploy = True
        fused = model(x)
    assert len(seven) == 7 and all(t.shape == (2, 1, 67, 45) for t in seven)
    assert fused.shape == (2, 1, 67, 45)
    torch.testing.assert_close(fused, seven[0])
    assert 0.0 <= float(fused.min()) and float(fused.max()) <= 1.0


def test_macs_are_counted_from_the_module():
    u2netp, lite = count_macs(build_arch("u2netp")), count_macs(build_arch("u2net-lite"))
    # a 1×1 conv on a 2×2 input counts exactly 2*2*in*out MACs
    conv = torch.nn.Conv2d(3, 5, 1)
    from u2zoo.zoo import archs

    assert archs.count_macs(torch.nn.Sequential(conv), 2, 2) == 2 * 2 * 3 * 5
    assert 15e9 < u2netp < 25e9 and lite < u2netp


def test_unknown_architecture_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'u2netp'"):
        build_arch("u2netpp")
