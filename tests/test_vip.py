"""Tests of token_prune.vip: 2D RoPE, the VIP against an independent float64
reference, per-image confinement, serialisation and the public-checkpoint
importer. CPU only, small sizes."""

import dataclasses
import json
import math
import os

import pytest
import torch

from token_prune.vip import (
    GlimpseConfig,
    GlimpseModules,
    VIP,
    apply_rope,
    cu_seqlens_from_grid,
    positions_from_grid,
    rope_2d_cos_sin,
    rope_2d_cos_sin_from_positions,
)


def small_config(**kw):
    base = dict(
        llm_hidden_size=32, llm_num_layers=6, llm_num_heads=5, llm_rms_norm_eps=1e-5,
        vision_width=24, vision_layers=[7, 5, 3], layer=3,
        hidden_size=16, cond_size=32, num_heads=4, mlp_ratio=2,
    )
    base.update(kw)
    return GlimpseConfig(**base)


def perturb_(mods, seed=0):
    """Move norms/biases off their init so the tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mods.named_parameters():
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return mods


def inputs(cfg, grid, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    grid_t = torch.tensor(grid, dtype=torch.long)
    n = int((grid_t[:, 0] * grid_t[:, 1]).sum())
    attn = torch.randn(n, cfg.llm_num_heads, generator=g, dtype=torch.float64).to(dtype)
    conds = [torch.randn(n, cfg.vision_width, generator=g, dtype=torch.float64).to(dtype)
             for _ in cfg.vision_layers]
    return attn, conds, grid_t


# ---------------------------------------------------------------- 2D RoPE


def test_rope_2d_hand_computed():
    grid = torch.tensor([[2, 3]])
    d, theta = 8, 100.0
    cos, sin = rope_2d_cos_sin(grid, d, theta, dtype=torch.float64)
    assert cos.shape == sin.shape == (6, d)
    # D/2 = 4 -> inv_freq over arange(0, 4, 2) / 4 = [0, 0.5] -> [1, 1/10]
    inv = [1.0, 1.0 / 10.0]
    positions = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for i, (r, c) in enumerate(positions):
        ang = [r * inv[0], r * inv[1], c * inv[0], c * inv[1]]
        ang = ang + ang
        assert cos[i].tolist() == pytest.approx([math.cos(a) for a in ang], abs=1e-12)
        assert sin[i].tolist() == pytest.approx([math.sin(a) for a in ang], abs=1e-12)


def test_rope_2d_restarts_per_image_and_preserves_norm():
    grid = torch.tensor([[2, 3], [3, 2], [1, 1]])
    cos, sin = rope_2d_cos_sin(grid, 12)
    c1, s1 = rope_2d_cos_sin(grid[1:2], 12)
    assert torch.equal(cos[6:12], c1) and torch.equal(sin[6:12], s1)
    assert torch.equal(cos[12], torch.ones(12)) and torch.equal(sin[12], torch.zeros(12))
    cos64, sin64 = rope_2d_cos_sin(grid, 12, dtype=torch.float64)
    x = torch.randn(13, 3, 12, dtype=torch.float64)
    y = apply_rope(x, cos64, sin64)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    # Relative position property: q.k after rotation depends on offsets only.
    cos2, sin2 = rope_2d_cos_sin(torch.tensor([[4, 4]]), 12, dtype=torch.float64)
    q, k = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    rot = lambda v, i: apply_rope(v.view(1, 1, 12), cos2[i:i + 1], sin2[i:i + 1]).view(12)
    # (0,0)->(1,2) vs (2,1)->(3,3): same offset (1, 2)
    assert torch.dot(rot(q, 0), rot(k, 6)).item() == pytest.approx(
        torch.dot(rot(q, 9), rot(k, 15)).item(), abs=1e-10)


def test_cu_seqlens():
    cu = cu_seqlens_from_grid(torch.tensor([[2, 3], [4, 1], [1, 1]]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 10, 11]
    assert cu_seqlens_from_grid(torch.zeros(0, 2, dtype=torch.long)).tolist() == [0]


# ---------------------------------------------------------------- VIP reference


def ref_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_vip(sd, cfg, attn, conds, grid, positions=None):
    """Independent float64 VIP: explicit loops over images and heads.

    ``positions`` (optional): a list per image of its tokens' (row, col); then ``grid`` is ignored
    and each image is one attention segment of that many tokens.
    """
    if positions is None:
        positions = [[(r, c) for r in range(h) for c in range(w)] for h, w in grid.tolist()]
    p = {k: v.double() for k, v in sd.items()}
    lin = lambda x, name, bias=True: x @ p[name + ".weight"].T + (p[name + ".bias"] if bias else 0)
    d = cfg.qk_head_dim
    dv = cfg.v_head_dim
    # RoPE tables from an explicit (row, col) loop.
    inv = [1.0 / cfg.rope_theta ** (2 * j / (d // 2)) for j in range(d // 4)]
    cos_rows, sin_rows = [], []
    for image in positions:
        for r, c in image:
            ang = [r * f for f in inv] + [c * f for f in inv]
            ang = ang + ang
            cos_rows.append([math.cos(a) for a in ang])
            sin_rows.append([math.sin(a) for a in ang])
    cos = torch.tensor(cos_rows, dtype=torch.float64)
    sin = torch.tensor(sin_rows, dtype=torch.float64)

    def rope(x):  # [n, d]
        x1, x2 = x[:, : d // 2], x[:, d // 2:]
        return x * cos_img + torch.cat([-x2, x1], -1) * sin_img

    x = lin(attn.double(), "attn_in_proj")
    for m, vm in enumerate(conds):
        cond = lin(vm.double(), f"cond_in_projs.{m}")
        pre = f"layers.{m}."
        hn = ref_rmsnorm(x, p[pre + "norm1.weight"], cfg.norm_eps)
        qk_in = torch.cat([hn, cond], -1)
        q_all = lin(qk_in, pre + "attn.q_proj", bias=False)
        k_all = lin(qk_in, pre + "attn.k_proj", bias=False)
        v_all = lin(hn, pre + "attn.v_proj", bias=False)
        out = torch.zeros(x.shape[0], cfg.hidden_size, dtype=torch.float64)
        start = 0
        for image in positions:
            sl = slice(start, start + len(image))
            cos_img, sin_img = cos[sl], sin[sl]
            for head in range(cfg.num_heads):
                q = rope(q_all[sl, head * d:(head + 1) * d])
                k = rope(k_all[sl, head * d:(head + 1) * d])
                v = v_all[sl, head * dv:(head + 1) * dv]
                a = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
                out[sl, head * dv:(head + 1) * dv] = a @ v
            start += len(image)
        x = x + lin(out, pre + "attn.o_proj", bias=False)
        hn = ref_rmsnorm(x, p[pre + "norm2.weight"], cfg.norm_eps)
        gate = lin(hn, pre + "mlp.gate_proj")
        x = x + lin(gate * torch.sigmoid(gate) * lin(hn, pre + "mlp.up_proj"), pre + "mlp.down_proj")
    n = len(conds)
    return lin(x, f"attn_out_projs.{n - 1}").squeeze(-1)


@pytest.mark.parametrize("grid", [[[3, 4]], [[2, 3], [4, 2], [1, 1]], [[2, 2], [2, 2]]])
def test_vip_matches_reference(grid):
    cfg = small_config()
    mods = perturb_(GlimpseModules.random(cfg, seed=1))
    attn, conds, grid_t = inputs(cfg, grid, seed=2, dtype=torch.float64)
    ref = ref_vip(mods.vip.state_dict(), cfg, attn, conds, grid_t)

    vip64 = mods.vip.double()
    out64 = vip64(attn, conds, grid_t)
    assert out64.dtype == torch.float64 and out64.shape == (attn.shape[0],)
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-10)

    vip32 = mods.vip.float()
    out32 = vip32(attn.float(), [c.float() for c in conds], grid_t)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-5)


def test_vip_default_sizes_head_dims():
    cfg = small_config(hidden_size=256, cond_size=512, num_heads=4)
    assert cfg.qk_head_dim == 192 and cfg.v_head_dim == 64
    mods = GlimpseModules.random(cfg, seed=0)
    attn, conds, grid = inputs(cfg, [[3, 5], [2, 2]])
    out = mods.vip(attn, conds, grid)
    assert out.shape == (19,) and torch.isfinite(out).all()
    ref = ref_vip(mods.vip.state_dict(), cfg, attn, conds, grid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_vip_confined_to_each_image():
    cfg = small_config()
    vip = perturb_(GlimpseModules.random(cfg, seed=3)).vip
    grid = [[3, 3], [2, 4]]
    attn, conds, grid_t = inputs(cfg, grid, seed=4)
    base = vip(attn, conds, grid_t)
    # Perturb image 2 (tokens 9..16) only.
    attn2 = attn.clone()
    attn2[9:] += 5 * torch.randn_like(attn2[9:])
    conds2 = [c.clone() for c in conds]
    for c in conds2:
        c[9:] = torch.randn_like(c[9:])
    pert = vip(attn2, conds2, grid_t)
    assert torch.equal(pert[:9], base[:9])
    assert not torch.allclose(pert[9:], base[9:])
    # Each image alone gives the same logits as in the batch.
    alone1 = vip(attn[:9], [c[:9] for c in conds], grid_t[:1])
    alone2 = vip(attn[9:], [c[9:] for c in conds], grid_t[1:])
    torch.testing.assert_close(torch.cat([alone1, alone2]), base, rtol=1e-6, atol=1e-6)


def test_vip_input_validation():
    cfg = small_config()
    vip = GlimpseModules.random(cfg, seed=0).vip
    attn, conds, grid = inputs(cfg, [[2, 2]])
    with pytest.raises(ValueError, match="llm_num_heads"):
        vip(attn[:, :-1], conds, grid)
    with pytest.raises(ValueError, match="grid_hw"):
        vip(attn, conds, torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="conditions"):
        vip(attn, conds[:-1], grid)
    with pytest.raises(ValueError, match=r"conditions\[1\]"):
        vip(attn, [conds[0], conds[1][:, :-1], conds[2]], grid)
    empty = vip(attn[:0], [c[:0] for c in conds], torch.zeros(0, 2, dtype=torch.long))
    assert empty.shape == (0,)


# ---------------------------------------------------------------- explicit positions


def test_rope_from_positions_equals_grid_tables():
    grid = torch.tensor([[2, 3], [4, 1], [1, 5]])
    pos = positions_from_grid(grid)
    assert pos.dtype == torch.long and pos.shape == (15, 2)
    assert pos[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert pos[6:10].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    for dtype in (torch.float32, torch.float64):
        c1, s1 = rope_2d_cos_sin(grid, 12, dtype=dtype)
        c2, s2 = rope_2d_cos_sin_from_positions(pos, 12, dtype=dtype)
        assert torch.equal(c1, c2) and torch.equal(s1, s2)
    # A token's table depends only on its own (row, col).
    c, s = rope_2d_cos_sin_from_positions(torch.tensor([[3, 7], [0, 0], [3, 7]]), 8, theta=100.0,
                                          dtype=torch.float64)
    assert torch.equal(c[0], c[2]) and torch.equal(c[1], torch.ones(8, dtype=torch.float64))
    expect = torch.tensor([3.0, 0.3, 7.0, 0.7] * 2, dtype=torch.float64)  # inv_freq [1, 1/10]
    torch.testing.assert_close(c[0], expect.cos(), rtol=0, atol=1e-15)
    torch.testing.assert_close(s[0], expect.sin(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("grid", [[[3, 4]], [[2, 3], [4, 2], [1, 1]], [[2, 2], [2, 2]]])
def test_vip_positions_from_grid_equal_grid_path(grid):
    cfg = small_config()
    vip = perturb_(GlimpseModules.random(cfg, seed=6)).vip
    attn, conds, grid_t = inputs(cfg, grid, seed=7)
    by_grid = vip(attn, conds, grid_t)
    lengths = (grid_t[:, 0] * grid_t[:, 1]).tolist()
    by_pos = vip(attn, conds, positions=positions_from_grid(grid_t), lengths=lengths)
    assert torch.equal(by_grid, by_pos)
    # lengths may be a tensor too
    assert torch.equal(vip(attn, conds, positions=positions_from_grid(grid_t), lengths=torch.tensor(lengths)), by_grid)


def test_vip_positions_path_matches_reference_on_a_nonrectangular_layout():
    """A LLaVA-NeXT-like image (a 2x2 base grid, then a 2-row grid of 3 columns + a newline column)
    and a plain 3x3 image: each image is one attention segment, RoPE from the given positions."""
    cfg = small_config()
    mods = perturb_(GlimpseModules.random(cfg, seed=8))
    image1 = [(r, c) for r in range(2) for c in range(2)] + [(r, c) for r in range(2) for c in range(4)]
    image2 = [(r, c) for r in range(3) for c in range(3)]
    positions = torch.tensor(image1 + image2)
    lengths = [len(image1), len(image2)]
    g = torch.Generator().manual_seed(9)
    n = positions.shape[0]
    attn = torch.randn(n, cfg.llm_num_heads, generator=g, dtype=torch.float64)
    conds = [torch.randn(n, cfg.vision_width, generator=g, dtype=torch.float64) for _ in cfg.vision_layers]
    ref = ref_vip(mods.vip.state_dict(), cfg, attn, conds, None, positions=[image1, image2])
    out = mods.vip.double()(attn, conds, positions=positions, lengths=lengths)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # Confined per image: the second image alone gives the same logits.
    alone = mods.vip(attn[12:], [c[12:] for c in conds], positions=positions[12:], lengths=[9])
    torch.testing.assert_close(alone, out[12:], rtol=1e-12, atol=1e-12)


def test_vip_positions_input_validation():
    cfg = small_config()
    vip = GlimpseModules.random(cfg, seed=0).vip
    attn, conds, grid = inputs(cfg, [[2, 2]])
    pos = positions_from_grid(grid)
    with pytest.raises(ValueError, match="not both"):
        vip(attn, conds, grid, positions=pos, lengths=[4])
    with pytest.raises(ValueError, match="needs lengths"):
        vip(attn, conds, positions=pos)
    with pytest.raises(ValueError, match="only used together"):
        vip(attn, conds, grid, lengths=[4])
    with pytest.raises(ValueError, match="grid_hw, or positions"):
        vip(attn, conds)
    with pytest.raises(ValueError, match="sum to 3"):
        vip(attn, conds, positions=pos, lengths=[3])
    with pytest.raises(ValueError, match=">= 1"):
        vip(attn, conds, positions=pos, lengths=[4, 0])
    with pytest.raises(ValueError, match="non-negative"):
        vip(attn, conds, positions=pos - 1, lengths=[4])
    with pytest.raises(ValueError, match="integer"):
        vip(attn, conds, positions=pos.float(), lengths=[4])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        vip(attn, conds, positions=pos[:, :1], lengths=[4])
    with pytest.raises(ValueError, match="gives 3 tokens"):
        vip(attn, conds, positions=pos[:3], lengths=[3])


def test_vip_bfloat16_close_to_float32():
    cfg = small_config(hidden_size=32, cond_size=32)
    mods = perturb_(GlimpseModules.random(cfg, seed=5))
    attn, conds, grid = inputs(cfg, [[4, 4], [3, 2]], seed=6)
    ref = mods.vip(attn, conds, grid)
    vip_bf = mods.to(torch.bfloat16).vip
    out = vip_bf(attn, conds, grid)  # inputs cast to bf16 inside
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    g = mods.glimpse.all_layers(2)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


# ---------------------------------------------------------------- glimpse embedding


def test_glimpse_embedding():
    cfg = small_config()
    mods = perturb_(GlimpseModules.random(cfg, seed=7))
    g = mods.glimpse
    assert g.embeddings.shape == (6, 1, 32)
    all_ = g.all_layers(4)
    assert all_.shape == (5, 32)
    for layer in range(5):
        torch.testing.assert_close(g(layer), all_[layer], rtol=1e-6, atol=1e-6)
    e = g.embeddings[2, 0].double()
    y = e @ g.proj.weight.double().T + g.proj.bias.double()
    y = g.norm.weight.double() * y / torch.sqrt((y * y).mean() + cfg.llm_rms_norm_eps)
    torch.testing.assert_close(g(2).double(), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        g(6)


def test_random_is_seeded_and_keeps_global_rng():
    cfg = small_config()
    state = torch.random.get_rng_state()
    a = GlimpseModules.random(cfg, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = GlimpseModules.random(cfg, seed=11)
    c = GlimpseModules.random(cfg, seed=12)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.glimpse.embeddings, c.glimpse.embeddings)
    std = a.glimpse.embeddings.std().item()
    assert 0.01 < std < 0.04
    assert torch.equal(a.vip.layers[0].norm1.weight, torch.ones(cfg.hidden_size))


# ---------------------------------------------------------------- config


def test_config_roundtrip_and_validation():
    cfg = small_config(glimpse_score="log_softmax", model_type="llava")
    d = cfg.to_dict()
    assert GlimpseConfig.from_dict(json.loads(json.dumps(d))) == cfg
    bad = [
        dict(layer=6), dict(layer=-1), dict(vision_layers=[]), dict(glimpse_score="softmax"),
        dict(num_heads=3), dict(hidden_size=0), dict(norm_eps=0.0), dict(llm_num_heads=True),
        dict(hidden_size=6, cond_size=6, num_heads=2),  # head dim 6, not divisible by 4
    ]
    for kw in bad:
        with pytest.raises(ValueError, match="GlimpseConfig"):
            small_config(**kw)
    with pytest.raises(ValueError, match="unknown"):
        GlimpseConfig.from_dict({**d, "foo": 1})
    d.pop("layer")
    with pytest.raises(ValueError, match="layer"):
        GlimpseConfig.from_dict(d)


# ---------------------------------------------------------------- save / load


def test_save_load_roundtrip(tmp_path):
    cfg = small_config()
    mods = perturb_(GlimpseModules.random(cfg, seed=8))
    mods.save(tmp_path / "gp")
    assert sorted(os.listdir(tmp_path / "gp")) == ["glimpse_config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "gp" / "glimpse_config.json").read_text())
    assert meta["format_version"] == 1 and meta["config"] == cfg.to_dict()
    loaded = GlimpseModules.load(tmp_path / "gp")
    assert loaded.config == cfg
    attn, conds, grid = inputs(cfg, [[2, 3], [3, 3]])
    assert torch.equal(loaded.vip(attn, conds, grid), mods.vip(attn, conds, grid))
    assert torch.equal(loaded.glimpse.all_layers(5), mods.glimpse.all_layers(5))
    assert set(loaded.state_dict()) == set(mods.state_dict())
    assert all(k.startswith(("glimpse.", "vip.")) for k in loaded.state_dict())

    # bf16 modules keep their dtype through a round trip.
    mods.to(torch.bfloat16).save(tmp_path / "bf")
    assert GlimpseModules.load(tmp_path / "bf").vip.attn_in_proj.weight.dtype == torch.bfloat16


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GlimpseModules.load(tmp_path / "nope")
    cfg = small_config()
    GlimpseModules.random(cfg, seed=0).save(tmp_path / "a")
    os.remove(tmp_path / "a" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GlimpseModules.load(tmp_path / "a")

    GlimpseModules.random(cfg, seed=0).save(tmp_path / "b")
    (tmp_path / "b" / "glimpse_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GlimpseModules.load(tmp_path / "b")

    # Weights written for a different VIP width: the error names the key and both shapes.
    GlimpseModules.random(small_config(hidden_size=32), seed=0).save(tmp_path / "c")
    GlimpseModules.random(cfg, seed=0).save(tmp_path / "d")
    os.replace(tmp_path / "d" / "glimpse_config.json", tmp_path / "c" / "glimpse_config.json")
    with pytest.raises(ValueError, match=r"vip\.attn_in_proj\.weight.*\(32, 5\).*\(16, 5\)"):
        GlimpseModules.load(tmp_path / "c")

    # Missing / unexpected keys are named.
    from safetensors.torch import load_file, save_file
    GlimpseModules.random(cfg, seed=0).save(tmp_path / "e")
    sd = load_file(str(tmp_path / "e" / "model.safetensors"))
    sd["vip.extra"] = sd.pop("vip.layers.1.norm2.weight")
    save_file(sd, str(tmp_path / "e" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: vip\.layers\.1\.norm2\.weight.*unexpected keys: vip\.extra"):
        GlimpseModules.load(tmp_path / "e")


# ---------------------------------------------------------------- public checkpoint


def write_public(path, mods, *, use_attention_logits=True, text_config=False,
                 extra_cfg=None, aux_heads=False):
    """A fake public GlimpsePrune checkpoint, with the public key names."""
    cfg = mods.config
    path.mkdir(parents=True, exist_ok=True)
    llm = {"hidden_size": cfg.llm_hidden_size, "num_hidden_layers": cfg.llm_num_layers,
           "num_attention_heads": cfg.llm_num_heads, "rms_norm_eps": cfg.llm_rms_norm_eps}
    hf = {
        "model_type": "qwen2_5_vl_gp",
        "vision_config": {"hidden_size": cfg.vision_width, "depth": 8},
        "selected_layers": [cfg.layer],
        "selected_visual_layers": list(cfg.vision_layers),
        "attn_fuse_size": cfg.hidden_size,
        "visual_cond_size": cfg.cond_size,
        "attn_fuse_num_heads": cfg.num_heads,
        "attn_fuse_type": "AttnFuserV1",
        "attn_fuse_hidden_act": "silu",
        "attn_fuse_global": True,
        "deep_supervision": aux_heads,
        "use_attention_logits": use_attention_logits,
        "le_layers": list(range(cfg.llm_num_layers)),
        "le_length": 1,
        "le_norm_type": "rmsnorm",
    }
    if text_config:
        hf["text_config"] = llm
    else:
        hf.update(llm)
    hf.update(extra_cfg or {})
    (path / "config.json").write_text(json.dumps(hf))

    v = mods.vip
    n = len(v.layers)
    fuser = {
        "attn_in_proj.weight": v.attn_in_proj.weight, "attn_in_proj.bias": v.attn_in_proj.bias,
        f"attn_out_projs.{n - 1}.weight": v.attn_out_projs[n - 1].weight,
        f"attn_out_projs.{n - 1}.bias": v.attn_out_projs[n - 1].bias,
    }
    for m in range(n):
        fuser[f"cond_in_projs.{m}.weight"] = v.cond_in_projs[m].weight
        fuser[f"cond_in_projs.{m}.bias"] = v.cond_in_projs[m].bias
        blk = v.layers[m]
        fuser[f"layers.{m}.norm1.weight"] = blk.norm1.weight
        fuser[f"layers.{m}.norm2.weight"] = blk.norm2.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fuser[f"layers.{m}.attn.{name}.weight"] = getattr(blk.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            fuser[f"layers.{m}.mlp.{name}.weight"] = getattr(blk.mlp, name).weight
            fuser[f"layers.{m}.mlp.{name}.bias"] = getattr(blk.mlp, name).bias
        if aux_heads and m < n - 1:
            fuser[f"attn_out_projs.{m}.weight"] = torch.randn(1, cfg.hidden_size)
            fuser[f"attn_out_projs.{m}.bias"] = torch.randn(1)
    g = mods.glimpse
    ckpt = {
        "attn_fuser": {k: t.detach().clone() for k, t in fuser.items()},
        "learnable_embeddings": g.embeddings.detach().clone(),
        "le_proj": {"weight": g.proj.weight.detach().clone(), "bias": g.proj.bias.detach().clone()},
        "le_norm": {"weight": g.norm.weight.detach().clone()},
    }
    torch.save(ckpt, path / "new_modules_gp.pt")
    return hf, ckpt


@pytest.mark.parametrize("text_config", [False, True])
def test_public_checkpoint_import(tmp_path, text_config):
    cfg = small_config(model_type="qwen2_5_vl_gp")  # how GlimpsePrune's fork names the family
    src = perturb_(GlimpseModules.random(cfg, seed=9))
    write_public(tmp_path / "pub", src, text_config=text_config)
    mods = GlimpseModules.from_public_checkpoint(tmp_path / "pub")
    assert mods.config == dataclasses.replace(cfg, model_type="qwen2_5_vl")
    attn, conds, grid = inputs(cfg, [[3, 2], [2, 2]])
    assert torch.equal(mods.vip(attn, conds, grid), src.vip(attn, conds, grid))
    assert torch.equal(mods.glimpse.all_layers(5), src.glimpse.all_layers(5))
    for layer in range(cfg.llm_num_layers):
        assert torch.equal(mods.glimpse(layer), src.glimpse(layer))


def test_public_checkpoint_glimpse_score_and_overrides(tmp_path):
    src = GlimpseModules.random(small_config(), seed=0)
    write_public(tmp_path / "q", src, use_attention_logits=True)
    assert GlimpseModules.from_public_checkpoint(tmp_path / "q").config.glimpse_score == "logits"
    write_public(tmp_path / "l", src, use_attention_logits=False)
    assert GlimpseModules.from_public_checkpoint(tmp_path / "l").config.glimpse_score == "log_softmax"
    m = GlimpseModules.from_public_checkpoint(tmp_path / "l", config_overrides={"layer": 1})
    assert m.config.layer == 1
    with pytest.raises(ValueError, match="unknown config_overrides"):
        GlimpseModules.from_public_checkpoint(tmp_path / "l", config_overrides={"bogus": 1})


def test_public_checkpoint_llava_style(tmp_path):
    """LLaVA-1.5 configs: no vision_config (width from mm_hidden_size or the
    weights); deep-supervision aux heads are ignored."""
    cfg = small_config(glimpse_score="log_softmax", model_type="llava")
    src = GlimpseModules.random(cfg, seed=10)
    hf, _ = write_public(tmp_path / "a", src, use_attention_logits=False, aux_heads=True,
                         extra_cfg={"model_type": "llava"})
    hf.pop("vision_config")
    (tmp_path / "a" / "config.json").write_text(json.dumps(hf))
    mods = GlimpseModules.from_public_checkpoint(tmp_path / "a")
    assert mods.config == cfg
    attn, conds, grid = inputs(cfg, [[4, 3]])
    assert torch.equal(mods.vip(attn, conds, grid), src.vip(attn, conds, grid))
    hf["mm_hidden_size"] = cfg.vision_width
    (tmp_path / "a" / "config.json").write_text(json.dumps(hf))
    assert GlimpseModules.from_public_checkpoint(tmp_path / "a").config.vision_width == 24


def test_public_checkpoint_errors(tmp_path):
    src = GlimpseModules.random(small_config(), seed=0)
    with pytest.raises(FileNotFoundError):
        GlimpseModules.from_public_checkpoint(tmp_path / "missing")

    hf, ckpt = write_public(tmp_path / "p", src)
    # le_layers not covering every layer
    bad = dict(hf, le_layers=[0, 1, 2])
    (tmp_path / "p" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="le_layers"):
        GlimpseModules.from_public_checkpoint(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps(dict(hf, selected_layers=[3, 4])))
    with pytest.raises(ValueError, match="selected_layers"):
        GlimpseModules.from_public_checkpoint(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps(hf))

    # missing / unexpected VIP keys named by their public names
    c2 = dict(ckpt, attn_fuser=dict(ckpt["attn_fuser"]))
    c2["attn_fuser"]["layers.1.attn.extra.weight"] = c2["attn_fuser"].pop("layers.1.attn.q_proj.weight")
    torch.save(c2, tmp_path / "p" / "new_modules_gp.pt")
    with pytest.raises(ValueError, match=r"missing keys: attn_fuser\.layers\.1\.attn\.q_proj\.weight"
                                         r".*unexpected keys: attn_fuser\.layers\.1\.attn\.extra\.weight"):
        GlimpseModules.from_public_checkpoint(tmp_path / "p")

    # wrong shape names the key and both shapes
    c3 = dict(ckpt, learnable_embeddings=torch.zeros(6, 1, 31))
    torch.save(c3, tmp_path / "p" / "new_modules_gp.pt")
    with pytest.raises(ValueError, match=r"learnable_embeddings.*\(6, 1, 31\).*\(6, 1, 32\)"):
        GlimpseModules.from_public_checkpoint(tmp_path / "p")

    # missing top-level entry
    c4 = {k: v for k, v in ckpt.items() if k != "le_norm"}
    torch.save(c4, tmp_path / "p" / "new_modules_gp.pt")
    with pytest.raises(ValueError, match="le_norm"):
        GlimpseModules.from_public_checkpoint(tmp_path / "p")


# ---------------------------------------------------------------- compatibility


def test_check_compatible():
    cfg = small_config()
    mods = GlimpseModules.random(cfg, seed=0)
    ok = dict(llm_hidden_size=32, llm_num_layers=6, llm_num_heads=5, vision_width=24,
              num_vision_blocks=8)
    mods.check_compatible(**ok)
    for key, value, match in [
        ("llm_hidden_size", 64, "llm_hidden_size"),
        ("llm_num_layers", 7, "llm_num_layers"),
        ("llm_num_heads", 4, "llm_num_heads"),
        ("vision_width", 32, "vision_width"),
        ("num_vision_blocks", 7, "vision_layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            mods.check_compatible(**dict(ok, **{key: value}))


def test_vip_state_dict_keys_match_public_layout():
    cfg = small_config(hidden_size=256, cond_size=512, vision_layers=[31, 23, 15, 7])
    keys = set(VIP(cfg).state_dict())
    assert "attn_out_projs.3.weight" in keys and "attn_out_projs.3.bias" in keys
    assert not any(k.startswith(("attn_out_projs.0", "attn_out_projs.1", "attn_out_projs.2")) for k in keys)
    assert {"layers.2.attn.q_proj.weight", "layers.2.mlp.down_proj.bias",
            "cond_in_projs.3.bias", "layers.0.norm1.weight"} <= keys
    assert VIP(cfg).layers[0].attn.q_proj.weight.shape == (768, 768)
    assert VIP(cfg).layers[0].attn.v_proj.weight.shape == (256, 256)
