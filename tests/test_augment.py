"""attnssl.augment: geometry shared by images and maps, crop boxes, colour ranges, reproducibility, API."""
import pytest
import torch

from attnssl.core import ConfigError
from attnssl.augment import (Augment, Normalize, byol_augment, crop_resize, light_augment, maps_to_float,
                             sample_crop_boxes, simclr_augment, to_float)

NO_COLOUR = dict(p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def coord_images(n, h, w):
    "Float images whose channel 0 is the x coordinate of the pixel centre / w, channel 1 the y one / h."
    xs = ((torch.arange(w) + 0.5) / w).expand(h, w)
    ys = ((torch.arange(h) + 0.5) / h)[:, None].expand(h, w)
    noise = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(0))
    return torch.cat([xs.expand(n, 1, h, w), ys.expand(n, 1, h, w), noise], 1).contiguous()


def expected_coords(boxes, flips, out, lo_edge, hi_edge, axis, extent):
    """Expected ramp value at each output position along `axis` (0: x, 1: y) and a mask of the positions whose
    bins lie inside [lo_edge, hi_edge] (away from the half pixel that roi_align clamps at the border)."""
    a0, a1 = boxes[:, axis], boxes[:, axis + 2]
    j = torch.arange(out, dtype=torch.float32)
    bw = ((a1 - a0) / out)[:, None]
    centre = a0[:, None] + (j + 0.5) * bw
    ok = (a0[:, None] + j * bw >= lo_edge) & (a0[:, None] + (j + 1) * bw <= hi_edge)
    val = centre / extent
    if axis == 0:  # a flip reverses the columns of the view
        val = torch.where(flips[:, None], val.flip(1), val); ok = torch.where(flips[:, None], ok.flip(1), ok)
    return val, ok


# ---------------------------------------------------------------- conversions

def test_to_float_and_maps_to_float():
    u8 = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    assert torch.allclose(to_float(u8), torch.tensor([[[[0, 1.0], [0.2, 0.4]]]]))
    mask = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.uint8)
    assert torch.equal(maps_to_float(mask), mask.float())          # masks are cast, not divided by 255
    assert to_float(torch.rand(1, 3, 2, 2, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ConfigError):
        to_float(torch.zeros(1, 3, 2, 2, dtype=torch.int64))


# ---------------------------------------------------------------- crop boxes

@pytest.mark.parametrize("h,w,scale,ratio", [(32, 32, (0.2, 1.0), (3 / 4, 4 / 3)), (24, 40, (0.08, 0.9), (0.5, 2.0)),
                                             (96, 30, (0.1, 0.4), (3 / 4, 4 / 3)), (32, 32, (0.95, 1.0), (0.5, 2.0))])
def test_crop_boxes_in_bounds_and_scale(h, w, scale, ratio):
    torch.manual_seed(0)
    b = sample_crop_boxes(5000, h, w, scale, ratio)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert b.shape == (5000, 4) and b.dtype == torch.float32
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all() and (bw > 0).all() and (bh > 0).all()
    frac = bw * bh / (h * w)
    assert frac.min() >= scale[0] - 1e-4 and frac.max() <= scale[1] + 1e-4
    assert (bw / bh).min() >= ratio[0] - 1e-3 and (bw / bh).max() <= ratio[1] + 1e-3
    # the boxes are spread over the image, not stuck in a corner
    if scale[1] < 1: assert b[:, 0].std() > 0.5 and b[:, 1].std() > 0.5


def test_crop_boxes_fallback_is_centred():
    b = sample_crop_boxes(3, 10, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # no square box has the image's area
    assert torch.allclose(b, torch.tensor([45.0, 0.0, 55.0, 10.0]).expand(3, 4))


# ---------------------------------------------------------------- crop_resize

def test_crop_resize_geometry_and_lower_resolution_maps():
    H, W, S = 20, 28, 10
    img = coord_images(4, H, W)
    boxes = torch.tensor([[0.0, 0.0, 28.0, 20.0], [3.5, 2.0, 17.5, 16.0], [10.0, 4.0, 14.0, 8.0], [1.0, 1.0, 27.0, 19.0]])
    half = coord_images(4, H // 2, W // 2)[:, :2]                 # same ramps at half resolution
    out, mout = crop_resize(img, boxes, S, maps=half)
    assert out.shape == (4, 3, S, S) and mout.shape == (4, 2, S, S)
    no_flip = torch.zeros(4, dtype=torch.bool)
    vx, okx = expected_coords(boxes, no_flip, S, 0.5, W - 0.5, 0, W)
    vy, oky = expected_coords(boxes, no_flip, S, 0.5, H - 0.5, 1, H)
    for t in (out, mout):
        gx = t[:, 0, S // 2, :]; gy = t[:, 1, :, S // 2]
        assert torch.allclose(gx[okx], vx[okx], atol=1e-5)
        assert torch.allclose(gy[oky], vy[oky], atol=1e-5)
    # the lower-resolution map (whose border clamp is a full image pixel wide) agrees inside [1, W-1]
    vxm, okm = expected_coords(boxes, no_flip, S, 1.0, W - 1.0, 0, W)
    assert torch.allclose(mout[:, 0, S // 2][okm], vxm[okm], atol=1e-5)
    assert okx.sum() > 20 and okm.sum() > 15


def test_crop_resize_upsamples_small_images_and_keeps_constants():
    img = torch.full((2, 3, 8, 8), 0.3)
    out, m = crop_resize(img, torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, 2.0, 5.0, 7.0]]), (32, 24))
    assert out.shape == (2, 3, 32, 24) and m is None
    assert torch.allclose(out, torch.full_like(out, 0.3))


def test_crop_resize_bad_input():
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="boxes"): crop_resize(img, torch.zeros(3, 4), 8)
    with pytest.raises(ConfigError, match="maps"): crop_resize(img, torch.zeros(2, 4) + torch.tensor([0, 0, 8, 8.]), 8,
                                                               maps=torch.rand(3, 1, 8, 8))
    with pytest.raises(ConfigError, match="size"): crop_resize(img, torch.tensor([[0, 0, 8, 8.]] * 2), 8.5)


# ---------------------------------------------------------------- alignment through the pipeline

@pytest.mark.parametrize("size,scale", [(16, (0.08, 1.0)), ((12, 20), (0.3, 0.6)), (48, (0.2, 1.0))])
def test_augment_keeps_images_and_maps_aligned(size, scale):
    H, W = 24, 32
    img = coord_images(64, H, W)
    aug = Augment(size, scale=scale, ratio=(0.5, 2.0), **NO_COLOUR)
    torch.manual_seed(1)
    views, maps = aug(img, img[:, :2])                  # the coordinate channels as maps
    p = aug.last_params
    assert 10 < int(p["flip"].sum()) < 54                 # both flipped and unflipped samples are tested
    assert torch.equal(views[:, :2], maps)                # identical geometry, bit for bit
    sh, sw = (size, size) if isinstance(size, int) else size
    vx, okx = expected_coords(p["boxes"], p["flip"], sw, 0.5, W - 0.5, 0, W)
    vy, oky = expected_coords(p["boxes"], p["flip"], sh, 0.5, H - 0.5, 1, H)
    gx = views[:, 0, sh // 2, :]; gy = views[:, 1, :, sw // 2]
    assert torch.allclose(gx[okx], vx[okx], atol=1e-4) and torch.allclose(gy[oky], vy[oky], atol=1e-4)


def test_mask_equal_to_image_channel_stays_aligned():
    torch.manual_seed(2)
    mask = (torch.rand(32, 1, 8, 8) > 0.5).float()
    mask = torch.nn.functional.interpolate(mask, size=32, mode="nearest").to(torch.uint8)   # blocky {0,1} masks
    img = torch.cat([torch.rand(32, 2, 32, 32), mask.float()], 1)                       # blue channel = mask
    v, m = simclr_augment(24, **NO_COLOUR)(img, mask)
    assert torch.equal(v[:, 2:], m)
    assert torch.equal((v[:, 2:] > 0.5), (m > 0.5)) and m.min() >= 0 and m.max() <= 1 and m.max() == 1


def test_no_crop_light_augment_is_exact_when_sizes_match():
    img = torch.rand(8, 3, 16, 16)
    keep = img.clone()
    torch.manual_seed(0)
    aug = light_augment(16, p_jitter=0.0, p_gray=0.0)
    v, m = aug(img, img[:, :1])
    f = aug.last_params["flip"]
    expect = torch.where(f[:, None, None, None], img.flip(-1), img)
    assert torch.equal(v, expect) and torch.equal(m, expect[:, :1])
    light_augment(16)(img, img[:, :1])
    assert torch.equal(img, keep)                          # the input is never modified in place
    assert torch.equal(aug.last_params["boxes"], torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(8, 4))
    v2, _ = light_augment(None, p_jitter=0.0, p_gray=0.0, p_flip=0.0)(torch.rand(2, 3, 9, 13))
    assert v2.shape == (2, 3, 9, 13)
    v3, m3 = light_augment(8)(img, torch.rand(8, 1, 4, 4))    # resized, not cropped
    assert v3.shape == (8, 3, 8, 8) and m3.shape == (8, 1, 8, 8)


# ---------------------------------------------------------------- colour ops

def test_brightness_factor_range_on_constant_images():
    b = 0.4
    const = torch.full((400, 3, 4, 4), 0.45)
    aug = Augment(4, crop=False, jitter=(b, 0, 0, 0), p_jitter=1.0, p_gray=0.0)
    torch.manual_seed(0)
    v, _ = aug(const)
    ratio = v[:, 0, 0, 0] / 0.45
    assert ratio.min() >= 1 - b - 1e-5 and ratio.max() <= 1 + b + 1e-5
    assert ratio.min() < 1 - b + 0.05 and ratio.max() > 1 + b - 0.05   # the whole range is used
    assert torch.allclose(ratio, aug.last_params["factors"][:, 0], atol=1e-5)
    assert torch.allclose(v, v[:, :1, :1, :1].expand_as(v))          # still constant, still gray


def test_contrast_saturation_hue_leave_gray_constants_alone_and_outputs_in_range():
    torch.manual_seed(0)
    gray = torch.full((64, 3, 6, 6), 0.6)
    v, _ = Augment(6, crop=False, jitter=(0, 0.8, 0.8, 0.5), p_jitter=1.0, p_gray=0.0)(gray)
    assert torch.allclose(v, gray, atol=1e-5)
    aug = Augment(8, jitter=(0.9, 0.9, 0.9, 0.5), p_jitter=1.0, p_gray=0.5, p_blur=0.5, p_solarize=0.5)
    v, _ = aug(torch.rand(256, 3, 12, 12))
    assert v.min() >= 0 and v.max() <= 1
    f, p = aug.last_params["factors"], aug.last_params
    assert (f[:, :3] >= 0.1 - 1e-6).all() and (f[:, :3] <= 1.9 + 1e-6).all() and (f[:, 3].abs() <= 0.5).all()
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(256, 4))
    assert len({tuple(o) for o in p["order"].tolist()}) > 12                # orders differ per sample
    s = p["sigma"][p["blur"]]
    assert (s >= 0.1).all() and (s <= 2.0).all() and (p["sigma"][~p["blur"]] == 0).all()


def test_jitter_only_touches_selected_samples():
    img = torch.rand(200, 3, 8, 8)
    aug = Augment(8, crop=False, p_flip=0.0, p_jitter=0.3, p_gray=0.0)
    torch.manual_seed(3)
    v, _ = aug(img)
    j = aug.last_params["jitter"]
    assert 30 < int(j.sum()) < 90
    assert torch.equal(v[~j], img[~j]) and not torch.allclose(v[j], img[j])
    assert (aug.last_params["factors"][~j] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()


def test_grayscale_blur_solarize():
    img = torch.rand(16, 3, 10, 10)
    g, _ = Augment(10, crop=False, p_flip=0.0, p_jitter=0.0, p_gray=1.0)(img)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    s, _ = Augment(10, crop=False, p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_solarize=1.0)(img)
    assert torch.equal(s, torch.where(img < 0.5, img, 1 - img))
    blur = Augment(10, crop=False, p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_blur=1.0)
    b, _ = blur(img)
    assert b.var((2, 3)).mean() < img.var((2, 3)).mean()
    c, _ = blur(torch.full((4, 3, 10, 10), 0.7))
    assert torch.allclose(c, torch.full_like(c, 0.7), atol=1e-5)
    # every op on every sample, and on a subset after a whole-batch op (in-place writes must stay valid)
    for p_gray in (1.0, 0.5):
        torch.manual_seed(0)
        out, _ = Augment(10, crop=False, p_flip=0.5, p_jitter=1.0, p_gray=p_gray, p_blur=0.5, p_solarize=0.5)(img)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1


def test_probabilities_are_respected():
    torch.manual_seed(0)
    p = Augment(8, p_flip=0.5, p_jitter=0.8, p_gray=0.2, p_blur=0.1, p_solarize=0.3).sample(20000, 8, 8)
    for key, prob in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.3)]:
        assert abs(p[key].float().mean().item() - prob) < 0.015, key


# ---------------------------------------------------------------- reproducibility, shapes, devices

def test_reproducible_for_a_seed_and_generator():
    img = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8)
    aug = simclr_augment(16, blur=True)
    torch.manual_seed(5); a, _ = aug(img)
    torch.manual_seed(5); b, _ = aug(img)
    torch.manual_seed(6); c, _ = aug(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    d, _ = aug(img, generator=torch.Generator().manual_seed(9))
    e, _ = aug(img, generator=torch.Generator().manual_seed(9))
    assert torch.equal(d, e) and torch.equal(torch.get_rng_state(), state)
    replay, _ = aug.apply(img, aug.last_params)
    assert torch.equal(replay, e)
    # the number of random numbers drawn does not depend on the probabilities
    torch.manual_seed(0); Augment(16, p_blur=0.0).sample(7, 20, 20); x = torch.rand(1)
    torch.manual_seed(0); Augment(16, p_blur=1.0, p_gray=1.0).sample(7, 20, 20); y = torch.rand(1)
    assert torch.equal(x, y)


def test_shapes_dtypes_and_maps_of_any_resolution():
    img = torch.randint(0, 256, (5, 3, 40, 30), dtype=torch.uint8)
    attn = torch.rand(5, 3, 10, 15)                       # other resolution and aspect: boxes are rescaled
    torch.manual_seed(0)
    v, m = Augment((24, 20), scale=(0.2, 1.0))(img, attn)
    assert v.shape == (5, 3, 24, 20) and v.dtype == torch.float32 and m.shape == (5, 3, 24, 20) and m.dtype == torch.float32
    v, m = simclr_augment(16)(img)
    assert v.shape == (5, 3, 16, 16) and m is None


@pytest.mark.parametrize("device", DEVICES)
def test_device_follows_input(device):
    img = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, device=device)
    mask = torch.randint(0, 2, (6, 1, 16, 16), dtype=torch.uint8, device=device)
    for aug in (simclr_augment(12, blur=True), *byol_augment(12), light_augment(16)):
        v, m = aug(img, mask)
        assert v.device.type == device and m.device.type == device
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert norm(v).device.type == device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_views_on_cpu_and_cuda():
    img = torch.rand(8, 3, 16, 16)
    aug = simclr_augment(12)
    torch.manual_seed(0); a, _ = aug(img)
    torch.manual_seed(0); b, _ = aug(img.cuda())
    assert torch.allclose(a, b.cpu(), atol=1e-4)


def test_images_smaller_than_crop_size_are_upsampled():
    torch.manual_seed(0)
    v, m = simclr_augment(64)(torch.rand(3, 3, 16, 16), torch.ones(3, 1, 16, 16))
    assert v.shape == (3, 3, 64, 64) and torch.allclose(m, torch.ones_like(m))


# ---------------------------------------------------------------- factories, options, Normalize

def test_factories_and_options():
    s = simclr_augment(32)
    assert s.scale == (0.2, 1.0) and s.jitter == (0.4, 0.4, 0.4, 0.1) and s.p_jitter == 0.8 and s.p_gray == 0.2
    assert s.p_blur == 0.0 and simclr_augment(32, blur=True).p_blur == 0.5 and simclr_augment(32, blur=0.3).p_blur == 0.3
    a1, a2 = byol_augment(32)
    assert (a1.p_blur, a2.p_blur, a1.p_solarize, a2.p_solarize) == (1.0, 0.1, 0.0, 0.2)
    assert a1.scale == (0.08, 1.0) and a1.jitter == (0.4, 0.4, 0.2, 0.1)
    l = light_augment(32)
    assert not l.crop and l.p_flip == 0.5 and l.p_jitter == 0.8 and l.p_gray == 0.2
    assert simclr_augment(32, p_flip=0.0).p_flip == 0.0                       # any Augment option passes through


@pytest.mark.parametrize("make", [lambda: simclr_augment(32, p_blurr=0.5), lambda: Augment(32, sigma=1),
                                  lambda: byol_augment(32, solarise=0.1), lambda: light_augment(32, crop_scale=1)])
def test_unknown_option_lists_valid_ones(make):
    with pytest.raises(ConfigError, match="valid augmentation options are: .*p_blur"):
        make()


@pytest.mark.parametrize("kw", [dict(p_flip=1.5), dict(scale=(0.5, 0.2)), dict(ratio=(0, 1)), dict(jitter=(0.4, 0.4, 0.4, 0.7)),
                                dict(jitter=(0.4, 0.4)), dict(blur_kernel=4), dict(blur_sigma=(0, 1))])
def test_bad_values_raise_config_error(kw):
    with pytest.raises(ConfigError):
        Augment(32, **kw)


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError, match="size"): Augment(None)
    aug = simclr_augment(8)
    with pytest.raises(ConfigError, match="channels"): aug(torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError): aug(torch.rand(3, 8, 8))
    with pytest.raises(ConfigError, match="maps"): aug(torch.rand(2, 3, 8, 8), torch.rand(3, 1, 8, 8))
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CPU"): aug(torch.rand(2, 3, 8, 8), generator=torch.Generator("cuda"))


def test_normalize():
    norm = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    x = torch.rand(4, 3, 5, 5)
    z = norm(x)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.5) / 0.25) and torch.allclose(norm.inverse(z), x, atol=1e-6)
    assert norm.state_dict() == {}                        # constants are not checkpoint state
    with pytest.raises(ConfigError): Normalize((0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ConfigError): Normalize((0.5,), (0.0,))


def test_colour_ops_match_torchvision_semantics():
    "Per-sample factors and order reproduce torchvision's functional colour ops on each image."
    from torchvision.transforms.v2 import functional as F
    from attnssl.augment import color_jitter, grayscale
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 12)
    fac = torch.tensor([[1.3, 0.7, 1.5, 0.1], [0.6, 1.4, 0.3, -0.2]] * 3)
    order = torch.stack([torch.randperm(4) for _ in range(6)])
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    ref = []
    for xi, f, o in zip(x, fac, order):
        for k in o.tolist(): xi = ops[k](xi, f[k].item())
        ref.append(xi)
    assert torch.allclose(color_jitter(x, fac, order), torch.stack(ref), atol=1e-4)
    # luma weights: kornia 0.299, torchvision 0.2989 for red
    assert torch.allclose(grayscale(x), F.rgb_to_grayscale(x, num_output_channels=3), atol=5e-4)

# --- SimCLR's composition study: extra ops and the one-branch Composition -------------------------------
from attnssl.augment import COMPOSITION_OPS, Composition, cutout, gaussian_noise, rotate90, sample_cutout_boxes, sobel

def test_gaussian_noise_statistics_and_range():
    torch.manual_seed(0)
    x = torch.full((3, 3, 64, 64), 0.5)
    out = gaussian_noise(x, torch.tensor([0.0, 0.05, 0.1]))
    assert torch.equal(out[0], x[0])
    for i, s in [(1, 0.05), (2, 0.1)]: assert abs(float((out[i] - 0.5).std()) - s) < 0.01
    assert float(gaussian_noise(torch.ones(1, 3, 8, 8), torch.tensor([1.0])).max()) <= 1.0

def test_cutout_paints_exactly_the_box_against_a_loop():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 10, 12)
    boxes = sample_cutout_boxes(4, 10, 12, side=(0.3, 0.6))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 12).all() and (boxes[:, 3] <= 10).all()
    assert torch.allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])       # squares
    out = cutout(x, boxes, fill=0.25)
    ref = x.clone()
    for b, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for i in range(10):
            for j in range(12):
                if x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1: ref[b, :, i, j] = 0.25
    assert torch.equal(out, ref)
    with pytest.raises(ConfigError, match="side"): sample_cutout_boxes(2, 8, 8, side=(0.5, 1.5))

def test_rotate90_matches_rot90_per_sample():
    x = torch.rand(5, 3, 6, 6)
    k = torch.tensor([0, 1, 2, 3, 5])
    out = rotate90(x, k)
    for i in range(5): assert torch.equal(out[i], torch.rot90(x[i], int(k[i]) % 4, dims=(-2, -1)))
    with pytest.raises(ConfigError, match="square"): rotate90(torch.rand(1, 3, 4, 6), torch.tensor([1]))

def test_sobel_edges_flat_and_range():
    x = torch.zeros(1, 3, 8, 8); x[..., 4:] = 1.0                     # one vertical edge
    s = sobel(x)
    assert s.shape == x.shape and float(s.max()) == pytest.approx(1.0) and float(s.min()) >= 0
    assert float(s[0, 0, :, 3:5].min()) > 0.4 and float(s[0, 0, :, :2].max()) < 1e-3    # on the edge / far from it
    assert float(sobel(torch.full((2, 3, 8, 8), 0.7)).max()) < 1e-3

def test_composition_ops_identity_order_and_validation():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    v, m = Composition(16)(x)
    assert torch.equal(v, to_float(x)) and m is None
    for op in COMPOSITION_OPS:
        out, _ = Composition(16, (op,))(x)
        assert out.shape == (4, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1, op
    with pytest.raises(ConfigError, match="valid ops"): Composition(16, ("crop", "jpeg"))
    # order matters: greyscale then noise has coloured noise; noise then greyscale does not
    torch.manual_seed(0); a, _ = Composition(16, ("greyscale", "noise"))(x)
    torch.manual_seed(0); b, _ = Composition(16, ("noise", "greyscale"))(x)
    assert not torch.equal(a[:, 0], a[:, 1]) and torch.equal(b[:, 0], b[:, 1])

def test_composition_geometry_moves_maps_colour_does_not():
    torch.manual_seed(2)
    content = torch.rand(6, 3, 16, 16)
    v, m = Composition(16, ("crop", "rotate"))(content, content.clone())
    assert torch.allclose(v, m, atol=1e-6)
    masks = torch.rand(6, 1, 8, 8)
    _, m2 = Composition(16, ("colour", "noise", "cutout", "blur", "sobel", "greyscale"))(content, masks)
    assert torch.allclose(m2, torch.nn.functional.interpolate(masks, size=16, mode="bilinear", align_corners=False), atol=1e-5)
