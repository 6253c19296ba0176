"""bench/augment.py: the device-resident CIFAR loader against torchvision's transforms (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms
from torchvision.transforms import functional as TF

from bench.augment import Cutout, DeviceCifarLoader, stream_seed

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def coord_images(n: int) -> torch.Tensor:
    """uint8 (n, 32, 32, 3): channel 0 = row + 1, channel 1 = col + 1, channel 2 = image index + 1 (mod 256).
    No real pixel is 0, so zero padding is recognisable and any crop/flip can be read back exactly."""
    img = torch.empty(n, 32, 32, 3, dtype=torch.uint8)
    img[..., 0] = (torch.arange(32) + 1)[None, :, None]
    img[..., 1] = (torch.arange(32) + 1)[None, None, :]
    img[..., 2] = ((torch.arange(n) % 255) + 1)[:, None, None]
    return img


def raw(x: torch.Tensor) -> torch.Tensor:
    """Undo a mean 0 / std 1 normalisation: the uint8 values, exactly."""
    return torch.round(x.float() * 255).to(torch.int64)


def recover(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) of crops of coord_images, from raw values (B, 3, 32, 32). The centre pixels are never
    padding: out(16, 16) reads source row dy + 12, column dx + 12 (dx + 11 when flipped)."""
    row16 = v[:, 0, 16, 16] - 1
    c16, c17 = v[:, 1, 16, 16] - 1, v[:, 1, 16, 17] - 1
    flip = c17 < c16
    dy = row16 - 12
    dx = torch.where(flip, c16 - 11, c16 - 12)
    return dy, dx, flip


def loader(images, labels=None, batch_size=64, train=True, seed=0, mean=(0.0,) * 3, std=(1.0,) * 3, **kw):
    labels = torch.arange(len(images)) if labels is None else labels
    return DeviceCifarLoader(images, labels, batch_size, train, mean, std, seed=seed, device="cpu", **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second OpenMP thread gains nothing and, on a busy 2-core machine, costs ~10x."""


@pytest.fixture(scope="module")
def offsets(one_thread):
    """(dy, dx, flip) of 16,000 training draws (2,000 images x 8 epochs)."""
    ld = loader(coord_images(2000), batch_size=500)
    dys, dxs, flips = [], [], []
    for _ in range(8):
        for x, y in ld:
            v = raw(x)
            assert torch.equal(v[:, 2, 16, 16], (y % 255) + 1)  # labels travel with their images
            dy, dx, flip = recover(v)
            dys.append(dy), dxs.append(dx), flips.append(flip)
    return torch.cat(dys), torch.cat(dxs), torch.cat(flips)


def test_recovered_crops_are_exact_torchvision_crops():
    """Every output equals torchvision's pad -> crop at the recovered offset -> flip -> ToTensor -> Normalize,
    bit for bit, padding included."""
    imgs = coord_images(300)
    ld = loader(imgs, batch_size=128, mean=MEAN, std=STD)
    plain = loader(imgs, batch_size=128)  # same seed and epoch, identity normalisation: read the offsets
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    for (x, y), (x0, y0) in zip(ld, plain):
        assert torch.equal(y, y0)
        dy, dx, flip = recover(raw(x0))
        for k in range(0, len(y), 7):
            pil = Image.fromarray(imgs[y[k]].numpy())
            crop = TF.crop(TF.pad(pil, 4), int(dy[k]), int(dx[k]), 32, 32)
            if flip[k]:
                crop = TF.hflip(crop)
            assert torch.equal(x[k], norm(crop))


def test_offsets_uniform_over_81_positions(offsets):
    dy, dx, _ = offsets
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    counts = torch.bincount(dy * 9 + dx, minlength=81).numpy()
    assert counts.shape == (81,) and (counts > 0).all()
    assert stats.chisquare(counts).pvalue > 1e-3  # fixed seeds: deterministic, not flaky


def test_flip_rate_half_and_independent_of_offset(offsets):
    dy, dx, flip = offsets
    assert abs(flip.float().mean().item() - 0.5) < 0.02  # 16,000 draws: sd 0.004
    table = np.array([[((dy * 9 + dx == p) & (flip == f)).sum().item() for p in range(81)] for f in (0, 1)])
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_same_distribution_as_torchvision_randomcrop_flip(offsets):
    """Offset histogram of ours vs torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip."""
    torch.manual_seed(0)
    tv = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor()])
    pil = Image.fromarray(coord_images(1)[0].numpy())
    v = torch.stack([tv(pil) for _ in range(4000)]).to(torch.int64)
    tdy, tdx, tflip = recover(v)
    dy, dx, flip = offsets
    ours = torch.bincount(dy * 9 + dx, minlength=81).numpy()
    theirs = torch.bincount(tdy * 9 + tdx, minlength=81).numpy()
    assert stats.chisquare(theirs).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([ours, theirs])).pvalue > 1e-3
    assert abs(tflip.float().mean().item() - flip.float().mean().item()) < 0.04


def test_padded_region_is_minus_mean_over_std():
    imgs = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)  # no real pixel reads as padding
    ld = loader(imgs, batch_size=64, mean=MEAN, std=STD)
    x, _ = next(iter(ld))
    pad_value = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1).expand_as(x)
    image_value = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1).expand_as(x)
    is_pad = torch.isclose(x, pad_value, rtol=0, atol=1e-6)
    assert (is_pad | torch.isclose(x, image_value, rtol=0, atol=1e-6)).all()
    assert is_pad.any()
    assert torch.equal(x[is_pad], pad_value[is_pad])  # exactly (0/255 - mean) / std
    # a pixel is padding for all channels or none
    assert torch.equal(is_pad.all(1), is_pad.any(1))


def test_eval_normalisation_identical_to_torchvision():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (37,), generator=g)
    ld = loader(imgs, labels, batch_size=16, train=False, mean=MEAN, std=STD)
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    xs, ys = zip(*ld)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y, labels)  # no shuffle
    expected = torch.stack([norm(img.numpy()) for img in imgs])
    assert torch.equal(x, expected)
    # an eval loader never augments: every epoch is the same
    assert torch.equal(torch.cat([b for b, _ in ld]), x)


def test_shuffle_covers_every_index_once_per_epoch():
    ld = loader(coord_images(250), batch_size=32)
    orders = []
    for _ in range(3):
        y = torch.cat([y for _, y in ld])
        assert torch.equal(torch.sort(y).values, torch.arange(250))
        orders.append(y)
    assert not torch.equal(orders[0], torch.arange(250))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_same_seed_and_epoch_same_batches_resumable():
    imgs = coord_images(100)
    a, b = loader(imgs, batch_size=32, seed=3), loader(imgs, batch_size=32, seed=3)
    first = [(x.clone(), y.clone()) for x, y in a]       # epoch 0
    second = [(x.clone(), y.clone()) for x, y in a]      # epoch 1
    assert a.epoch == 2
    for (x, y), (x2, y2) in zip(first, b):               # a fresh loader at epoch 0
        assert torch.equal(x, x2) and torch.equal(y, y2)
    b.epoch = 1                                          # a run resumed at epoch 1
    for (x, y), (x2, y2) in zip(second, b):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert b.epoch == 2
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    other = loader(imgs, batch_size=32, seed=4)
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in first]))


def test_drop_last_false_sizes_and_len():
    ld = loader(coord_images(10), batch_size=4)
    assert len(ld) == 3 and len(ld.dataset) == 10
    assert [len(y) for _, y in ld] == [4, 4, 2]
    assert [x.shape[0] for x, _ in loader(coord_images(10), batch_size=4, train=False)] == [4, 4, 2]
    assert len(loader(coord_images(8), batch_size=4)) == 2


def test_dtypes_devices_and_channels_last():
    ld = loader(coord_images(20), batch_size=8, channels_last=True, mean=MEAN, std=STD)
    x, y = next(iter(ld))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (8, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = loader(coord_images(20), batch_size=8, mean=MEAN, std=STD)
    assert torch.equal(next(iter(plain))[0], x)  # the layout changes nothing else
    x16, _ = next(iter(loader(coord_images(20), batch_size=8, dtype=torch.bfloat16, mean=MEAN, std=STD)))
    assert x16.dtype == torch.bfloat16 and torch.equal(x16, x.to(torch.bfloat16))
    xe, _ = next(iter(loader(coord_images(20), batch_size=8, train=False, channels_last=True)))
    assert xe.is_contiguous(memory_format=torch.channels_last)


def test_bad_input_refused():
    with pytest.raises(ValueError, match="uint8"):
        loader(coord_images(4).float())
    with pytest.raises(ValueError, match="labels"):
        loader(coord_images(4), torch.arange(3))
    with pytest.raises(ValueError, match="mean"):
        loader(coord_images(4), mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=">= 0"):
        loader(coord_images(4), seed=-1)


def test_stream_seed_distinct():
    seeds = {stream_seed(s, e, k) for s in range(5) for e in range(5) for k in range(2)}
    assert len(seeds) == 50 and stream_seed(1, 2, 0) == stream_seed(1, 2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_given_the_same_draws():
    imgs = coord_images(64)
    cpu = loader(imgs, batch_size=64, mean=MEAN, std=STD)
    gpu = DeviceCifarLoader(imgs, torch.arange(64), 64, True, MEAN, STD, seed=0, device="cuda")
    order, dy, dx, flip = gpu.epoch_draws(0)
    x_gpu, y_gpu = next(iter(gpu))
    assert x_gpu.is_cuda and torch.equal(order.cpu(), cpu.epoch_draws(0)[0])  # same order on any device
    x_cpu = cpu._normalise(cpu.crop_flip(order.cpu(), dy.cpu(), dx.cpu(), flip.cpu()))
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=0, atol=1e-6)
    assert torch.equal(y_gpu.cpu(), order.cpu())


# -- layouts, reflect padding, cutout (SVHN / Fashion-MNIST and the SAM code's augmentations) ---------------

def test_nchw_and_one_channel_layouts_give_the_same_batches():
    imgs = coord_images(50)
    ref = [(x.clone(), y.clone()) for x, y in loader(imgs, batch_size=16, seed=2)]
    nchw = loader(imgs.permute(0, 3, 1, 2).contiguous(), batch_size=16, seed=2, layout="NCHW")
    for (x, y), (x2, y2) in zip(ref, nchw):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    grey = loader(imgs[..., 0].contiguous(), batch_size=16, seed=2, mean=(0.0,), std=(1.0,))  # (N, H, W)
    for (x, y), (x1, y1) in zip(ref, grey):
        assert x1.shape == (len(y), 1, 32, 32) and torch.equal(x[:, :1], x1) and torch.equal(y, y1)
    with pytest.raises(ValueError, match="layout"):
        loader(imgs, layout="HWC")


def test_reflect_crops_are_exact_torchvision_reflect_crops():
    """padding_mode="reflect" (the SAM code's basic) equals torchvision's pad(reflect) -> crop -> flip, bit for
    bit: no pixel is zero padding, every border pixel is a mirrored image pixel."""
    imgs = coord_images(200)
    ld = loader(imgs, batch_size=100, padding_mode="reflect")
    order, dy, dx, flip = ld.epoch_draws(0)
    x, y = next(iter(ld))
    assert torch.equal(y, order[:100]) and (raw(x) > 0).all()
    for k in range(0, 100, 3):
        pil = Image.fromarray(imgs[y[k]].numpy())
        crop = TF.crop(TF.pad(pil, 4, padding_mode="reflect"), int(dy[k]), int(dx[k]), 32, 32)
        if flip[k]:
            crop = TF.hflip(crop)
        assert torch.equal(raw(x[k]), TF.pil_to_tensor(crop).to(torch.int64))


def test_no_crop_flip_yields_the_images_in_epoch_order():
    imgs = coord_images(40)
    ld = loader(imgs, batch_size=40, crop_flip=False)
    x, y = next(iter(ld))
    assert torch.equal(y, ld.epoch_draws(0)[0]) and torch.equal(raw(x), imgs[y].permute(0, 3, 1, 2).long())


def cutout_boxes(x: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of the zeros of each image, asserting they form one full-channel rectangle."""
    boxes = []
    for img in x:
        zero = img == 0
        assert torch.equal(zero.all(0), zero.any(0))  # every channel, or none
        rows, cols = zero[0].any(1).nonzero()[:, 0], zero[0].any(0).nonzero()[:, 0]
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        assert zero[0].sum() == (r1 - r0) * (c1 - c0)  # a filled rectangle
        boxes.append((r0, r1, c0, c1))
    return boxes


def test_device_cutout_zeroes_exactly_the_clipped_16x16_square_after_normalisation():
    imgs = torch.full((300, 32, 32, 3), 200, dtype=torch.uint8)  # normalised: never 0 outside the patch
    ld = loader(imgs, batch_size=300, mean=MEAN, std=STD, cutout=16)
    cy, cx = ld.cutout_draws(0)
    x, y = next(iter(ld))
    sizes = set()
    for (r0, r1, c0, c1), a, b in zip(cutout_boxes(x), cy.tolist(), cx.tolist()):
        assert (r0, r1, c0, c1) == (max(0, a - 8), min(32, a + 8), max(0, b - 8), min(32, b + 8))
        sizes.add((r1 - r0, c1 - c0))
    assert (16, 16) in sizes and any(h < 16 for h, _ in sizes)  # whole squares and squares clipped by a border
    # the crops and flips are those of the same loader without cutout (a stream of its own)
    plain, _ = next(iter(loader(imgs, batch_size=300, mean=MEAN, std=STD)))
    assert torch.equal(x[x != 0], plain[x != 0])


def test_cpu_cutout_transform_is_seeded_and_clipped():
    """bench.augment.Cutout (torchvision path): the same square for the same torch seed, clipped at borders."""
    boxes = []
    for seed in range(200):
        torch.manual_seed(seed)
        boxes += cutout_boxes(Cutout(16)(torch.ones(1, 28, 28))[None])
    torch.manual_seed(7)
    a = Cutout(16)(torch.ones(3, 32, 32))
    torch.manual_seed(7)
    assert torch.equal(a, Cutout(16)(torch.ones(3, 32, 32)))
    heights = {r1 - r0 for r0, r1, _, _ in boxes}
    assert max(heights) == 16 and min(heights) == 8 and all(0 <= r0 and r1 <= 28 for r0, r1, _, _ in boxes)
    assert {r0 for r0, *_ in boxes} >= {0, 12}  # every centre row 0..27 is reachable
