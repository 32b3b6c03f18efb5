"""NVIDIA DALI input pipelines: manifest rows -> training batches for every task of :mod:`rcl_dist.data.spec`.

One pipeline definition serves both devices: ``device_id=None`` builds a CPU-only graph; an integer
``device_id`` (the *local* GPU index) decodes with the ``"mixed"`` backend and does the crops, the
Eq. 8 noise and the resizing on that GPU. What the pipelines produce is
:class:`~rcl_dist.data.spec.PairSpec`'s contract, the same pairs as :mod:`rcl_dist.data.reference`.
Only what a sample needs is decoded: the window of its crop (ROI decoding, ``fn.decoders.image_slice``;
for pre-training the parent crop, the only place the noise is drawn), and on a CPU a small pre-training
set is decoded once and kept in memory (:mod:`rcl_dist.data.decoded`). Decoding keeps 16-bit files'
full depth; crops are integer slices (even for RAW, so each starts on an R pixel); fixed realisations
are read in step with the images; the file list is padded so every rank yields the same number of
batches per epoch; a vanished file is left out when the loader is built,
and one that vanishes mid-epoch fails the loader loudly instead of yielding empty epochs. The
reasons behind each of these: ``docs/data.md``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from rcl_dist.data.decoded import DEFAULT_BUDGET, DecodedImages, decode_into_memory, fits, keep_until_collected
from rcl_dist.data.manifest import load_manifest
from rcl_dist.data.spec import PairSpec, crop_geometry, pipeline_rows, derived_seed, is_real_noisy, real_partner, simulated_path

__all__ = ["build_pipeline", "DALILoader"]

# fn.lookup_table accepts keys in [0, 65535]: bigger manifests use one table per block of rows.
_LUT_BLOCK = 65536
# rgb -> grey as skimage.color.rgb2gray, the conversion of rcl_dist.data.images.load_image(gray=True)
_LUMA = (0.2125, 0.7154, 0.0721)


# --------------------------------------------------------------------------------------------------
# What a pipeline reads: rows, files, per-row parameters (pure Python, no DALI)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    rows: pa.Table  # usable rows; a sample's label is its row number here
    images: list[str] | None  # decoded image per label (None: not read)
    partners: list[str] | None  # task "real": the *_mean file per label
    noisy: list[list[str]]  # fixed realisations per label: one list per realisation index
    shot: np.ndarray
    read: np.ndarray
    order: list[int]  # labels in reader order, padded to a multiple of num_shards
    gray_decode: bool  # decode straight to GRAY (every selected file is 1-channel)
    all_8bit: bool  # every selected file is 8-bit: decode to uint8 and scale (3x faster than FLOAT)
    per_shard: int  # samples per shard and epoch (padding repeats included)
    skipped: list[str] = field(default_factory=list)
    decoded: DecodedImages | None = None  # pretrain: every image decoded once, kept in memory (data/decoded.py)


def _existing(table: pa.Table, spec: PairSpec, reads_image: bool) -> tuple[pa.Table, list[str], list[str] | None, list[str]]:
    """The rows whose files (and real partners) still exist: (rows, paths, partners, vanished files), with a warning."""
    paths = table["path"].to_pylist()
    keep = np.ones(len(paths), dtype=bool)
    skipped: list[str] = []
    partners = None
    if reads_image:
        for i, p in enumerate(paths):
            if not os.path.isfile(p):
                keep[i] = False
                skipped.append(p)
        if spec.task == "real":
            # a pair folder's manifest lists both files of a pair: the *_real ones are the samples
            keep &= np.array([is_real_noisy(p) for p in paths], dtype=bool)
            partners = [real_partner(p) if is_real_noisy(p) else "" for p in paths]
            for i, q in enumerate(partners):
                if keep[i] and not os.path.isfile(q):
                    keep[i] = False
                    skipped.append(q)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(
            f"{len(skipped)} file(s) listed in the manifest no longer exist and are skipped: {shown}", stacklevel=4
        )
    if not keep.all():
        table = table.filter(pa.array(keep))
        paths = [p for p, k in zip(paths, keep) if k]
        if partners is not None:
            partners = [q for q, k in zip(partners, keep) if k]
    if table.num_rows == 0:
        raise ValueError(f"no image file of split {spec.split!r} is left to read ({len(skipped)} vanished)")
    return table, paths, partners, skipped


def _fixed_realisations(table: pa.Table, spec: PairSpec, simulated_dir: str | os.PathLike | None, n: int) -> list[list[str]]:
    """The stored noisy realisations of every row, one list per realisation index; all must exist."""
    if simulated_dir is None:
        raise ValueError("realisation='fixed' needs simulated_dir (the --out folder of `rcl-dist data simulate`)")
    raw = spec.raw is not None
    ids = table["image_id"].to_pylist()
    noisy: list[list[str]] = []
    for index in range(n):
        files = [str(simulated_path(simulated_dir, i, raw=raw, index=index)) for i in ids]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            flags = (" --raw" if raw else "") + (" --pairs" if index else "")
            raise FileNotFoundError(
                f"{len(missing)} fixed noisy realisation(s) missing, e.g. {missing[0]}: run "
                f"`rcl-dist data simulate --manifest MANIFEST --out {simulated_dir}{flags}` first"
            )
        noisy.append(files)
    _check_simulated_channels(noisy[0][0], 1 if (raw or spec.gray) else 3)
    return noisy


def _plan(manifest: pa.Table | str | os.PathLike, spec: PairSpec, simulated_dir: str | os.PathLike | None) -> _Plan:
    table = pipeline_rows(load_manifest(manifest), spec, stacklevel=4)  # split, *_real, small-image rule

    fixed = spec.realisation == "fixed" and spec.task in ("pretrain", "n2n", "denoise", "jdd")
    if spec.realisation == "fixed" and spec.task == "jdensr":
        raise ValueError(
            "task 'jdensr' adds noise to the LR image; a stored realisation is of the full-size image, and "
            "downscaling it would change the noise level: use realisation='fresh'"
        )
    reads_image = not (fixed and spec.task in ("pretrain", "n2n"))
    table, paths, partners, skipped = _existing(table, spec, reads_image)
    noisy = _fixed_realisations(table, spec, simulated_dir, 2 if spec.task == "n2n" else 1) if fixed else []

    n = table.num_rows
    k = spec.num_shards
    per_shard = math.ceil(n / k)
    if per_shard < spec.batch_size:
        raise ValueError(
            f"{n} usable images of split {spec.split!r} give {per_shard} per shard ({k} shard(s)), fewer than "
            f"the batch size {spec.batch_size}: no full batch per epoch"
        )
    # pad to a multiple of num_shards (docs/data.md: keeps DALI's reader and iterator epochs in step)
    pad = per_shard * k - n
    extra = np.random.default_rng(spec.seed).choice(n, size=pad, replace=pad > n).tolist() if pad else []
    gray_decode = bool(spec.gray) and "channels" in table.column_names and all(
        c == 1 for c in table["channels"].to_pylist()
    )
    return _Plan(
        rows=table,
        images=paths if reads_image else None,
        partners=partners,
        noisy=noisy,
        shot=table["shot"].to_numpy(zero_copy_only=False).astype(np.float64),
        read=table["read"].to_numpy(zero_copy_only=False).astype(np.float64),
        order=list(range(n)) + extra,
        gray_decode=gray_decode,
        all_8bit="bit_depth" in table.column_names and all(int(b) == 8 for b in table.column("bit_depth").to_pylist()),
        per_shard=per_shard,
        skipped=skipped,
    )


def _check_simulated_channels(path: str, channels: int) -> None:
    # only the first file's header: reading every header would touch each file twice per build
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 3 or arr.shape[-1] != channels or arr.dtype != np.float32:
        raise ValueError(
            f"{path}: expected a float32 HWC array with {channels} channel(s), got {arr.dtype} {arr.shape}; "
            f"re-run `rcl-dist data simulate` with the options of this run"
        )


# --------------------------------------------------------------------------------------------------
# The DALI graph
# --------------------------------------------------------------------------------------------------


class _Ops:
    """The graph's building blocks (readers, decoding, crops, mosaic, Eq. 8 noise, CHW outputs) for one pipeline.

    Every method adds DALI operators, so they are called inside ``@pipeline_def``, in the order the graph
    needs them (the order fixes the operators' seeds and the CPU noise draws' generators).
    """

    def __init__(self, plan: _Plan, spec: PairSpec, gpu: bool, prefetch: int = 2) -> None:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types

        self.fn, self.dmath, self.types = fn, dmath, types
        self.plan, self.spec, self.gpu, self.prefetch = plan, spec, gpu, prefetch
        self.raw = spec.raw is not None
        self.channels = 1 if spec.gray else 3
        self.fixed = bool(plan.noisy)
        self.reader_args = dict(
            shard_id=spec.shard_id,
            num_shards=spec.num_shards,
            random_shuffle=True,
            seed=spec.seed,  # the same on every rank and in every reader of this pipeline: they stay in step
            pad_last_batch=True,
        )
        self._shot = self._read = None  # the labels' Eq. 8 parameters, looked up once
        self._noise_sources: list[Any] = []

    def to_dev(self, x):
        return x.gpu() if self.gpu else x

    def const(self, a: np.ndarray):
        return self.types.Constant(np.ascontiguousarray(a, dtype=np.float32), device="gpu" if self.gpu else "cpu")

    def image_reader(self, files: list[str], name: str | None):
        order = self.plan.order
        enc, label = self.fn.readers.file(files=[files[i] for i in order], labels=order, name=name, **self.reader_args)
        return enc, self.fn.squeeze(label, axes=[0])  # [1] -> scalar row index

    def numpy_reader(self, files: list[str], name: str | None):
        return self.fn.readers.numpy(files=[files[i] for i in self.plan.order], name=name, **self.reader_args)

    def to_float(self, x):
        """uint8 -> float in [0, 1] (k/255, exact: the same as decoding to FLOAT, 3x cheaper on a CPU)."""
        return self.fn.cast(x, dtype=self.types.FLOAT) * (1.0 / 255.0)

    def decode_kind(self):
        """GRAY when every file is 1-channel and the spec asks for grey, else RGB (grey then via luma)."""
        return self.types.GRAY if self.spec.gray and self.plan.gray_decode else self.types.RGB

    def luma(self, img):
        """RGB -> grey as skimage.color.rgb2gray when a grey spec reads RGB files; else ``img`` itself."""
        if self.spec.gray and not self.plan.gray_decode:
            return self.fn.reductions.sum(img * self.const(np.array(_LUMA)), axes=[2], keep_dims=True)
        return img

    def decode_window(self, enc, start, size: int):
        """The size x size window at ``start`` (int32 [y, x]) of an encoded image, float HWC in [0, 1].

        Only that region is decoded (ROI decoding, ``fn.decoders.image_slice``; the ``"mixed"`` backend on
        a GPU), so the cast and everything after it touch the window, not the whole image. 16-bit files
        keep their depth (decoded to FLOAT: /65535).
        """
        fn, types = self.fn, self.types
        args = dict(start=start, shape=[size, size], axes=[0, 1], device="mixed" if self.gpu else "cpu",
                    output_type=self.decode_kind())  # fmt: skip
        if self.plan.all_8bit:
            img = self.to_float(fn.decoders.image_slice(enc, **args))
        else:
            img = fn.decoders.image_slice(enc, **args, dtype=types.FLOAT)
        return self.luma(img)

    def decoded_reader(self):
        """(the uint8 HWC image of each sample from the decoded copy in memory, its [h, w], its label)."""
        fn, types, decoded = self.fn, self.types, self.plan.decoded
        raw, label = self.image_reader(decoded.files, "Reader")  # raw pixel bytes, read like the image files
        h, w = _lookup(fn, types, label, decoded.heights), _lookup(fn, types, label, decoded.widths)
        shape = fn.cast(fn.stack(h, w, h * 0.0 + float(decoded.channels)), dtype=types.INT32)
        return fn.reshape(raw, shape=shape, layout="HWC"), fn.stack(h, w), label

    def hw_of_encoded(self, enc):
        return self.fn.peek_image_shape(enc, dtype=self.types.FLOAT)[0:2]

    def hw_of_array(self, arr):
        return arr.shape(dtype=self.types.FLOAT)[0:2]

    def position(self, n):
        """[2] random integers in [0, n) per axis (n: a [2] node or a Python int)."""
        u = self.fn.random.uniform(range=[0.0, 1.0], shape=[2])
        return self.dmath.min(self.dmath.floor(u * n), n - 1)  # min: u may round up to 1.0 in float32

    def anchor(self, hw, size: int, even: bool):
        """int32 [y, x] top-left corner of a size x size window inside hw, even for RAW."""
        room = hw - float(size)  # last valid position per axis
        a = self.position(self.dmath.floor(room / 2.0) + 1.0) * 2.0 if even else self.position(room + 1.0)
        return self.fn.cast(a, dtype=self.types.INT32)

    def offset(self, max_shift: int, even: bool):
        """int32 [dy, dx] in [0, max_shift] per axis (even steps for RAW; max_shift is then even)."""
        a = self.position(max_shift // 2 + 1) * 2.0 if even else self.position(max_shift + 1)
        return self.fn.cast(a, dtype=self.types.INT32)

    def crop(self, x, start, size: int):
        return self.fn.slice(x, start=start, shape=[size, size], axes=[0, 1])

    def mosaic(self, rgb, size: int):
        """[size, size, 3] -> [size, size, 1] RGGB (rcl_dist.noise.mosaic): per-colour masks, summed over C."""
        m = np.zeros((size, size, 3), dtype=np.float32)
        m[0::2, 0::2, 0] = 1.0  # R
        m[0::2, 1::2, 1] = 1.0  # G on the red rows
        m[1::2, 0::2, 1] = 1.0  # G on the blue rows
        m[1::2, 1::2, 2] = 1.0  # B
        return self.fn.reductions.sum(rgb * self.const(m), axes=[2], keep_dims=True)

    def noise_params(self, label):
        if self._shot is None:
            fn, types, plan = self.fn, self.types, self.plan
            self._shot = self.to_dev(_lookup(fn, types, label, plan.shot))
            self._read = self.to_dev(_lookup(fn, types, label, plan.read))
        return self._shot, self._read

    def add_noise(self, x, label, hwc: tuple[int, int, int]):
        """Eq. 8: x + sqrt(max(shot*x + read, 0)) * N(0, 1) with the image's own (shot, read).

        ``hwc``: the static shape of x (for pre-training, the parent crop: the only place noise is drawn).
        On the GPU the draw is DALI's ``fn.random.normal``. On the CPU DALI's normal generator produces
        ~60 M values/s on 2 cores against ~400 M/s for torch's vectorised one, and it bounded the whole
        pipeline (see benchmarks/results/data_throughput.md): there the N(0, 1) batch comes from a
        torch.Generator (seeded per rank and per draw) through an external source, and DALI does the
        arithmetic. The draw fills one of a ring of preallocated buffers in place and DALI reads it
        without a copy (``no_copy``): a buffer is refilled ``prefetch + 3`` draws later, after DALI is
        done with it (DALI's rule: a fed buffer may change once ``prefetch`` more iterations have run).
        """
        spec, fn = self.spec, self.fn
        if spec.noise == "none":  # real noisy photographs: the pixels as they are
            return x
        sh, rd = self.noise_params(label)
        if self.gpu:
            eps = fn.random.normal(x, device="gpu")  # same shape as x, new draw per call
        else:
            n_draw = str(len(self._noise_sources))
            gen = torch.Generator().manual_seed(derived_seed(spec.seed, "dali-noise", str(spec.shard_id), n_draw))
            ring = [torch.empty((spec.batch_size, *hwc)) for _ in range(self.prefetch + 3)]
            fills = iter(range(1 << 62))

            def draw():
                return ring[next(fills) % len(ring)].normal_(generator=gen).numpy()

            self._noise_sources.append(draw)
            eps = fn.external_source(source=draw, batch=True, dtype=self.types.FLOAT, layout="HWC", no_copy=True)
        return x + self.dmath.sqrt(self.dmath.max(sh * x + rd, 0.0)) * eps

    def out(self, x):
        """HWC -> CHW; a 1-channel mosaic becomes the packed planes (R, G_r, G_b, B) when asked."""
        fn = self.fn
        if self.raw and self.spec.raw == "packed":
            h = w = self.spec.crop // 2
            x = fn.reshape(x, shape=[h, 2, w, 2], layout="")  # [y, dy, x, dx]
            x = fn.transpose(x, perm=[1, 3, 0, 2])  # [dy, dx, y, x]
            return fn.reshape(x, shape=[4, h, w], layout="CHW")  # plane dy*2+dx: R, G_r, G_b, B
        return fn.transpose(x, perm=[2, 0, 1])


# Each task's part of the graph: (its outputs in spec.keys order, the row-index node or None)


def _pretrain_graph(o: _Ops):
    """Task pretrain: two overlapping crops q, k of one noisy parent crop (noise drawn once, shared)."""
    c, raw, label = o.spec.crop, o.raw, None
    max_shift, parent_side = crop_geometry(c, o.spec.overlap, even=raw)
    if o.fixed:
        arr = o.numpy_reader(o.plan.noisy[0], "Reader")
        parent = o.to_dev(o.crop(arr, o.anchor(o.hw_of_array(arr), parent_side, raw), parent_side))
    else:
        if o.plan.decoded is not None:  # decoded once, in memory: cut the parent crop out of the pixels
            img, hw, label = o.decoded_reader()
            parent = o.luma(o.to_float(o.to_dev(o.crop(img, o.anchor(hw, parent_side, raw), parent_side))))
        else:  # decode the parent crop alone
            enc, label = o.image_reader(o.plan.images, "Reader")
            parent = o.decode_window(enc, o.anchor(o.hw_of_encoded(enc), parent_side, raw), parent_side)
        if raw:
            parent = o.mosaic(parent, parent_side)  # before the noise: noise lives in the RAW domain
        parent = o.add_noise(parent, label, (parent_side, parent_side, 1 if raw else o.channels))  # once: both crops share it
    q = o.crop(parent, o.offset(max_shift, raw), c)
    k = o.crop(parent, o.offset(max_shift, raw), c)
    return [o.out(q), o.out(k)], label


def _n2n_graph(o: _Ops):
    """Task n2n: two independent noisy realisations of one crop."""
    c, label = o.spec.crop, None
    if o.fixed:
        a0 = o.numpy_reader(o.plan.noisy[0], "Reader")
        a1 = o.numpy_reader(o.plan.noisy[1], None)
        at = o.anchor(o.dmath.min(o.hw_of_array(a0), o.hw_of_array(a1)), c, False)
        return [o.out(o.to_dev(o.crop(a0, at, c))), o.out(o.to_dev(o.crop(a1, at, c)))], label
    enc, label = o.image_reader(o.plan.images, "Reader")
    clean = o.decode_window(enc, o.anchor(o.hw_of_encoded(enc), c, False), c)
    hwc = (c, c, o.channels)
    return [o.out(o.add_noise(clean, label, hwc)), o.out(o.add_noise(clean, label, hwc))], label


def _denoise_graph(o: _Ops):
    """Tasks denoise and jdd: (noisy, clean) crops at one position; jdd's noisy one is the noisy mosaic."""
    c, even = o.spec.crop, o.spec.task == "jdd"
    enc, label = o.image_reader(o.plan.images, "Reader")
    hw = o.hw_of_encoded(enc)
    if o.fixed:
        arr = o.numpy_reader(o.plan.noisy[0], None)
        at = o.anchor(o.dmath.min(hw, o.hw_of_array(arr)), c, even)
        noisy = o.to_dev(o.crop(arr, at, c))
        clean = o.decode_window(enc, at, c)
    else:
        clean = o.decode_window(enc, o.anchor(hw, c, even), c)
        noisy = o.add_noise(o.mosaic(clean, c) if even else clean, label, (c, c, 1 if even else o.channels))
    return [o.out(noisy), o.fn.transpose(clean, perm=[2, 0, 1])], label


def _sr_graph(o: _Ops):
    """Tasks sr and jdensr: (bicubic LR, HR) crops; jdensr's LR one is noisy."""
    c = o.spec.crop
    enc, label = o.image_reader(o.plan.images, "Reader")
    hr = o.decode_window(enc, o.anchor(o.hw_of_encoded(enc), c, False), c)
    lr_side = c // o.spec.scale
    lr = o.fn.resize(hr, size=[lr_side, lr_side], interp_type=o.types.INTERP_CUBIC, antialias=True)
    if o.spec.task == "jdensr":
        lr = o.add_noise(lr, label, (lr_side, lr_side, o.channels))
    return [o.out(lr), o.out(hr)], label


def _real_graph(o: _Ops):
    """Task real: (noisy *_real, clean *_mean) crops of a real pair at one position."""
    c = o.spec.crop
    enc, label = o.image_reader(o.plan.images, "Reader")
    enc_mean, _ = o.image_reader(o.plan.partners, None)
    at = o.anchor(o.dmath.min(o.hw_of_encoded(enc), o.hw_of_encoded(enc_mean)), c, False)  # one position for both
    return [o.out(o.decode_window(enc, at, c)), o.out(o.decode_window(enc_mean, at, c))], label


_TASK_GRAPHS = {"pretrain": _pretrain_graph, "n2n": _n2n_graph, "denoise": _denoise_graph, "jdd": _denoise_graph,
                "sr": _sr_graph, "jdensr": _sr_graph, "real": _real_graph}  # fmt: skip


def _graph(plan: _Plan, spec: PairSpec, gpu: bool, return_index: bool, prefetch: int = 2):
    """The body of the pipeline (called inside ``@pipeline_def``); returns the outputs in ``spec.keys`` order."""
    if spec.task not in _TASK_GRAPHS:  # PairSpec validates the task
        raise AssertionError(spec.task)
    ops = _Ops(plan, spec, gpu, prefetch)
    outs, label = _TASK_GRAPHS[spec.task](ops)
    if return_index:
        if label is None:  # fixed pretrain / n2n read no image: a file reader of the same list gives the labels
            _, label = ops.image_reader(plan.noisy[0], None)
        outs.append(label)
    return tuple(outs)


def _lookup(fn, types, label, values: np.ndarray):
    """Per-sample float ``values[label]`` (lookup tables of at most _LUT_BLOCK keys, summed)."""
    total = None
    for start in range(0, len(values), _LUT_BLOCK):
        block = values[start : start + _LUT_BLOCK]
        key = label - start if start else label  # out of this block's range -> default 0
        v = fn.lookup_table(
            key, keys=list(range(len(block))), values=[float(x) for x in block], default_value=0.0, dtype=types.FLOAT
        )
        total = v if total is None else total + v
    return total


def _dali_cause(message: str) -> str:
    """The line of a DALI pipeline error that says what went wrong (e.g. "File mapping failed: PATH")."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if "encountered:" in lines:
        rest = lines[lines.index("encountered:") + 1 :]
        if rest:
            return rest[0]
    return lines[-1] if lines else "unknown error"


def _output_names(spec: PairSpec, return_index: bool) -> list[str]:
    return [*spec.keys, *(["index"] if return_index else [])]


def _build(plan: _Plan, spec: PairSpec, device_id: int | None, num_threads: int, prefetch: int, return_index: bool):
    from nvidia.dali import pipeline_def

    @pipeline_def
    def rcl_pipeline():
        return _graph(plan, spec, device_id is not None, return_index, prefetch)

    pipe = rcl_pipeline(
        batch_size=spec.batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=spec.seed + spec.shard_id,  # fresh noise and positions differ between ranks
        prefetch_queue_depth=prefetch,
    )
    pipe.build()
    return pipe


def _planned_pipeline(
    manifest: pa.Table | str | os.PathLike,
    spec: PairSpec,
    *,
    device_id: int | None = None,
    num_threads: int = 2,
    simulated_dir: str | os.PathLike | None = None,
    prefetch: int = 2,
    return_index: bool = False,
    keep_decoded: bool | None = None,
) -> tuple[_Plan, Any, list[str]]:
    """(the plan, the built pipeline, its output names): the options of :func:`build_pipeline` and
    :class:`DALILoader`, in one place."""
    plan = _plan(manifest, spec, simulated_dir)
    if _keeps_decoded(plan, spec, device_id, keep_decoded):
        plan.decoded = decode_into_memory(plan.images, gray=spec.gray and plan.gray_decode, num_threads=num_threads)
    pipe = _build(plan, spec, device_id, num_threads, prefetch, return_index)
    if plan.decoded is not None:
        keep_until_collected(pipe, plan.decoded)
    return plan, pipe, _output_names(spec, return_index)


def _keeps_decoded(plan: _Plan, spec: PairSpec, device_id: int | None, asked: bool | None) -> bool:
    """Whether the pre-training images are decoded once and kept in memory (rcl_dist/data/decoded.py).

    ``asked`` None: on a CPU pipeline when the decoded 8-bit images fit :data:`DEFAULT_BUDGET` (and a
    quarter of the free memory folder); measured here, cutting the parent crop out of decoded pixels
    instead of decoding it (ROI) took the input stage from ~2,400 to ~9,000 crops/s at 64x64. On a GPU the
    mixed decoder is the fast path. True asks for it (still only for what it applies to), False never.
    """
    applies = spec.task == "pretrain" and plan.images is not None and not plan.noisy and plan.all_8bit
    if asked is False or not applies:
        return False
    channels = 1 if spec.gray and plan.gray_decode else 3
    nbytes = channels * sum(int(w) * int(h) for w, h in zip(plan.rows["width"].to_pylist(), plan.rows["height"].to_pylist()))
    return bool(asked) or (device_id is None and fits(nbytes, DEFAULT_BUDGET))


def build_pipeline(manifest: pa.Table | str | os.PathLike, spec: PairSpec, **options: Any):
    """The built DALI pipeline of ``spec`` over the manifest (a pyarrow Table or a parquet path).

    Outputs, in order: ``spec.keys`` as float32 CHW samples, then (``return_index``) the int32 row
    index of each sample into the usable rows (:attr:`DALILoader.rows`). Keyword options:
    ``device_id`` (None, the default: a CPU-only pipeline; else the local GPU index), ``num_threads``
    (2), ``simulated_dir`` (the folder of fixed realisations, needed for ``realisation="fixed"``),
    ``prefetch`` (2, DALI's prefetch queue depth), ``return_index`` (False) and ``keep_decoded``
    (None: pre-training images decoded once and kept in memory where they fit, on a CPU; True / False:
    asked for or never; see :func:`_keeps_decoded`). Its reader is named ``"Reader"``.
    """
    return _planned_pipeline(manifest, spec, **options)[1]


class DALILoader:
    """Iterable of batches ``{key: float32 tensor [B, C, H, W]}`` (keys ``spec.keys``; with
    ``return_index`` also ``"index"``: int64 [B] rows of :attr:`rows`), one epoch per ``for`` loop.

    ``len()`` is the number of batches per epoch, the same on every rank (``docs/data.md``). Tensors are
    on the CPU for ``device_id=None``, else on that GPU. Breaking out of an epoch early leaves the rest of
    it for the next loop: DALI's iterator cannot restart an epoch halfway.
    """

    def __init__(self, manifest: pa.Table | str | os.PathLike, spec: PairSpec, **options: Any) -> None:
        """``options``: those of :func:`build_pipeline` (``device_id``, ``num_threads``, ``simulated_dir``,
        ``prefetch``, ``return_index``, ``keep_decoded``)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.spec = spec
        self._plan, self.pipeline, self._names = _planned_pipeline(manifest, spec, **options)
        self._failed: str | None = None
        self._iter = DALIGenericIterator(
            [self.pipeline],
            self._names,
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=True,
        )

    @property
    def rows(self) -> pa.Table:
        """The manifest rows this loader reads; ``batch["index"]`` indexes them."""
        return self._plan.rows

    @property
    def keeps_decoded(self) -> bool:
        """Whether the images were decoded once when the loader was built and are read from memory."""
        return self._plan.decoded is not None

    @property
    def skipped(self) -> int:
        """How many listed files had vanished when the loader was built (left out with a warning)."""
        return len(self._plan.skipped)

    @property
    def skipped_paths(self) -> list[str]:
        return list(self._plan.skipped)

    @property
    def samples_per_shard(self) -> int:
        """Samples in this rank's shard per epoch, padding repeats included (before dropping the last partial batch)."""
        return self._plan.per_shard

    def __len__(self) -> int:
        return len(self._iter)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._failed is not None:
            raise RuntimeError(f"this DALILoader's pipeline failed earlier ({self._failed}); build a new one")
        try:
            for batch in self._iter:
                b = batch[0]
                if "index" in b:
                    b["index"] = b["index"].reshape(-1).long()
                yield b
        except RuntimeError as e:
            # DALI invalidates the pipeline after an operator error; its iterator would then yield empty
            # epochs without a word, so every later use raises instead
            self._failed = _dali_cause(str(e))
            raise RuntimeError(
                f"DALI pipeline failed mid-epoch: {self._failed}. A file that vanished or changed after the loader "
                f"was built cannot be skipped by DALI's reader; build a new DALILoader (it re-checks the files and "
                f"leaves out missing ones)"
            ) from e

    def reset(self) -> None:
        self._iter.reset()
