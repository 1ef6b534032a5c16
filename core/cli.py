"""The ``promptseg`` command: segment images, check the install, manage the cache.

Adapters add sub-commands (``promptseg fiftyone ...``, ``promptseg labelstudio ...``) through
the ``promptseg_add_commands`` hook, so this module imports no host package.
"""

from __future__ import annotations

import argparse
import glob
import ipaddress
import json
import logging
import os
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from promptseg.errors import OptionError, PromptsegError

logger = logging.getLogger("promptseg")

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_BUG = 0, 1, 2, 3
EXIT_CODES = (
    "Exit codes: 0 all done; 1 some images were skipped (each reported, the others written); "
    "2 usage or setup error (bad option, prompt, model or --out: one line says what and how to fix it); "
    "3 unexpected error (a bug: the traceback is printed)."
)

COCO_FILE = "results.coco.json"
OUTPUT_SUFFIXES = {
    "png": (".labels.png", ".overlay.png"), "json": (".json",), "coco": (), "stack": (".labels.tif",),
}
OUTPUT_NAMES = (
    "Output names: each image's results go under --out at the image's folder relative to the folder "
    "all inputs share, named after the file without its extension (a/same.png and b/same.png give "
    "OUT/a/same.labels.png and OUT/b/same.labels.png). Inputs that would share a name (x.png and "
    "x.jpg) keep their extension: OUT/x.png.labels.png, OUT/x.jpg.labels.png. A file given twice is "
    "segmented once; a run whose results would replace one of its inputs stops before it starts."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptseg",
        description="Type what you want segmented, get every instance of it as a mask (SAM 3).",
        epilog=EXIT_CODES,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment images with text prompts (or one object by --point/--box)",
                         description="Segment every instance of each prompt in each image.",
                         epilog=f"{OUTPUT_NAMES} {EXIT_CODES}")
    seg.add_argument("images", nargs="+", metavar="IMAGE",
                     help="image files (png, jpg, tif, ...), folders of them, quoted patterns such as 'photos/*.jpg', "
                     "or videos (mp4, mov, ...; folders and TIFFs with --video)")
    seg.add_argument("-p", "--prompt", dest="prompts", action="append", default=None,
                     metavar="PROMPT", help="a noun phrase, e.g. 'red car'; repeat for several")
    seg.add_argument("--point", dest="points", action="append", type=point_argument, default=None,
                     metavar="X,Y[,LABEL]", help="instead of prompts, one object: a pixel click (label 1 on the "
                     "object, the default, or 0 not on it); repeat for several")
    seg.add_argument("--box", type=box_argument, default=None, metavar="X0,Y0,X1,Y1",
                     help="instead of prompts, one object: its pixel box (with or without --point)")
    seg.add_argument("--out", type=Path, default=Path("promptseg-out"),
                     help="output folder; see 'Output names' below (default: %(default)s)")
    seg.add_argument("--format", choices=["png", "coco", "json"], default="png",
                     help="png: instance-label PNG + overlay PNG per image; coco: one COCO results "
                     "file; json: one JSON per image (default: %(default)s)")
    seg.add_argument("--stack", action="store_true",
                     help="treat each image as a Z/T stack (multi-page or OME-TIFF): write STEM.labels.tif")
    seg.add_argument("--axes", default=None, help="with --stack: axis layout such as ZYX, TCYX (default: from the file)")
    seg.add_argument("--link", type=float, nargs="?", const=0.3, default=None, metavar="IOU",
                     help="with --stack: give an object one id through the slices (mask IoU, default 0.3)")
    seg.add_argument("--video", action="store_true",
                     help="treat folders of frames and TIFF time series as videos too (video files such as "
                     ".mp4, .mov, .avi, .mkv are videos by their suffix): SAM 3's video model keeps each "
                     "object's id through the frames; writes STEM/frame_NNNNNN.png, STEM.labels.tif and "
                     "STEM.tracks.json")
    seg.add_argument("--stride", type=int, default=None, metavar="N",
                     help="videos: segment every N-th frame (default: every frame)")
    seg.add_argument("--frames", type=frames_argument, default=None, metavar="A:B",
                     help="videos: segment frames A to B-1 only (either end may be left out, e.g. 10: or :50)")
    seg.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="segment the images on Ray actors (pip install 'promptseg[ray]'): a cluster's ADDRESS "
                     "(HOST:6379, or 'auto' on one of its machines), or none for a local Ray; same outputs "
                     "(see docs/scaling.md)")
    seg.add_argument("--actors", type=int, default=2, metavar="N",
                     help="with --ray: how many actors, each with one loaded model on one CPU, or on one GPU with "
                     "--device cuda (default: %(default)s)")
    add_model_options(seg)
    add_segment_options(seg)
    seg.set_defaults(func=run_segment)

    doctor = sub.add_parser("doctor", help="check the install and run a tiny model end to end")
    doctor.add_argument("--model", default=None, help="model to check (default: PROMPTSEG_MODEL or facebook/sam3)")
    doctor.set_defaults(func=run_doctor)

    suggest = sub.add_parser("suggest", help="list what CLIP sees in an image (prompt ideas)",
                             description="Rank a vocabulary (default: COCO + LVIS object names) by "
                             "CLIP image-text similarity and print the top phrases.")
    suggest.add_argument("image", metavar="IMAGE", help="image file")
    suggest.add_argument("-k", type=int, default=10, help="how many phrases (default: %(default)s)")
    suggest.add_argument("--vocabulary", type=Path, default=None,
                         help="text file with one phrase per line (default: the shipped COCO + LVIS names)")
    suggest.add_argument("--clip", default=None, metavar="MODEL",
                         help="CLIP model (default: PROMPTSEG_CLIP or ViT-B-32/laion2b_s34b_b79k)")
    suggest.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N or mps")
    suggest.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    suggest.add_argument("--cache-dir", default=None, help="embedding cache: a folder or a shared store's URL (s3://...)")
    suggest.set_defaults(func=run_suggest)

    cache = sub.add_parser("cache", help="show or clear the embedding cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache-dir", default=None, help="cache folder, or a shared store's URL for its local tier (default: PROMPTSEG_CACHE_DIR or the user cache dir)")
    cache.set_defaults(func=run_cache)

    from promptseg.plugins import plugin_manager

    plugin_manager().hook.promptseg_add_commands(subparsers=sub)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that choose and place the model; shared with adapters' commands."""
    parser.add_argument("--model", default=None, help="hub id or local directory (default: PROMPTSEG_MODEL or facebook/sam3)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--cache-dir", default=None, help="embedding cache: a folder or a shared store's URL (s3://...)")
    parser.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="skip images over N pixels (height x width), a guard against decompression "
                        "bombs (default: PROMPTSEG_MAX_PIXELS, else 268,435,456)")
    parser.add_argument("--clip", default=None, metavar="MODEL",
                        help="add a CLIP scorer: NAME/TAG (e.g. ViT-B-32/laion2b_s34b_b79k), NAME/PATH, "
                        "hf-hub:ORG/REPO or local-dir:DIR; every instance gets clip_score and a fused score")


ARGUMENT_SHAPES = {  # how an option reads on the command line; its default and help come from SegmentOptions
    "tile": {"metavar": "PX|auto"},
    "overlap": {"metavar": "PX"},
    "percentiles": {"metavar": ("LOW", "HIGH")},
    "channels": {"metavar": "C"},
    "negative": {"metavar": "TEXT", "action": "append", "help_more": "; repeat for several"},
}


def add_segment_options(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One argument per segment option (`names`, default all), built from `SegmentOptions.describe`.

    Arguments left out of the command line stay out of the namespace, so `segment_options` applies
    only what was given, on top of the defaults written in `promptseg.options`.
    """
    from promptseg.options import SegmentOptions, option_info

    for name in SegmentOptions.names() if names is None else names:
        info = option_info(name)
        parser.add_argument(info.flag, dest=info.name, **option_argument(info))


def option_argument(info) -> dict:
    """`argparse` keywords for one `promptseg.options.OptionInfo`."""
    shape = dict(ARGUMENT_SHAPES.get(info.name, {}))
    keywords = {"default": argparse.SUPPRESS, "help": _cli_help(info) + shape.pop("help_more", "")}
    if info.kind is bool:
        return {**keywords, "action": "store_true"}
    words = info.words + (("none",) if info.optional and info.default is not None else ())
    keywords["type"] = _number_or_words(info.kind, words, info.flag) if words else info.kind
    if isinstance(info.count, int):
        keywords["nargs"] = info.count
    elif info.count == "+" and shape.get("action") != "append":
        keywords["nargs"] = "+"
    return {**keywords, **shape}


def _cli_help(info) -> str:
    """The option's help as the command line says it: ``none`` is a word here, an unset option the default."""
    text = info.help
    if info.default is None:
        text = text.replace("(None: ", "(default: ")
    elif info.optional:
        text = text.replace("(None: ", "('none': ")
    if info.default is not None and info.default is not False and info.default != ():
        shown = " ".join(map(str, info.default)) if isinstance(info.default, tuple) else info.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def _number_or_words(kind: type, words: tuple[str, ...], flag: str):
    """An argparse type taking a `kind` number or one of `words` (``none`` -> None)."""
    noun = "number of pixels" if kind is int else "number"

    def parse(value: str):
        if value.lower() in words:
            return None if value.lower() == "none" else value.lower()
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} takes a {noun} or {' or '.join(map(repr, words))}, not {value!r}"
            ) from None

    return parse


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535 (the servers' --port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value}")
    return value


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def point_argument(text: str) -> tuple[float, float, int]:
    """``x,y`` or ``x,y,label`` (label 1 or 0) -> ``(x, y, label)``."""
    parts = text.split(",")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or (len(numbers) == 3 and numbers[2] not in (0, 1)):
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y or X,Y,LABEL (pixels; LABEL 1 or 0), e.g. 120,80,1")
    return numbers[0], numbers[1], int(numbers[2]) if len(numbers) == 3 else 1


def box_argument(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` -> four floats."""
    try:
        numbers = tuple(float(part) for part in text.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not X0,Y0,X1,Y1 (pixel corners), e.g. 40,30,110,80")
    return numbers


def frames_argument(text: str) -> tuple[int | None, int | None]:
    """``A:B`` -> ``(A, B)``, either end optional (``10:``, ``:50``)."""
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frames takes A:B (whole numbers, e.g. 10:50 or 10:), got {text!r}") from None


def visual_prompts(args: argparse.Namespace) -> dict | None:
    """The `segment_object` prompts of a command line (checked), or None for a text-prompt run."""
    if not args.points and args.box is None:
        return None
    if args.prompts:
        raise OptionError("Give text prompts (-p) or one object's --point/--box, not both: run them as two commands.")
    if args.stack:
        raise OptionError("--point and --box segment one image at a time: leave out --stack.")
    from promptseg.visual import check_visual_prompts

    points = [(x, y) for x, y, _ in args.points] if args.points else None
    labels = [label for _, _, label in args.points] if args.points else None
    check_visual_prompts(points, labels, args.box)
    return {"points": points, "point_labels": labels, "box": args.box}


def segment_options(args: argparse.Namespace):
    """The `SegmentOptions` of a command line: the options given on it, the defaults for the rest."""
    from promptseg.options import SegmentOptions

    return SegmentOptions.from_flat(**{name: getattr(args, name) for name in SegmentOptions.names() if hasattr(args, name)})


def load_from_args(args: argparse.Namespace):
    from promptseg.segmenter import load_segmenter

    cache_dir = False if getattr(args, "no_cache", False) else args.cache_dir
    return load_segmenter(args.model, device=args.device, dtype=args.dtype, cache_dir=cache_dir,
                          clip=getattr(args, "clip", None), max_pixels=getattr(args, "max_pixels", None))


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image inputs as files: a folder gives the image files under it (sorted, subfolders too), a
    pattern such as ``'photos/*.jpg'`` that names no file gives its matches (quoted, so the shell
    leaves it alone; ``**`` crosses folders); anything else stays as given."""
    from PIL import Image

    suffixes = set(Image.registered_extensions()) | {".tif", ".tiff"}
    files = []
    for item in inputs:
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise OptionError(f"The folder {item} holds no image files ({', '.join(sorted(suffixes)[:6])}, ...): "
                                  "pass another folder, or the files themselves.")
            files += found
        elif not os.path.exists(item) and any(mark in item for mark in "*?["):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise OptionError(f"No file matches {item}: check the pattern (quote it so the shell leaves it to "
                                  "promptseg; ** crosses folders).")
            files += found
        else:
            files.append(item)
    return files


def distinct_files(images: list[str]) -> tuple[list[str], list[str]]:
    """The inputs with repeats of the same file removed (first spelling kept), and the repeats."""
    seen, distinct, repeated = set(), [], []
    for image in images:
        key = Path(image).resolve()
        (repeated if key in seen else distinct).append(image)
        seen.add(key)
    return distinct, repeated


def image_stem(name: str) -> str:
    """The file name without its extension; ``.ome.tif`` / ``.ome.tiff`` count as one."""
    for suffix in (".ome.tif", ".ome.tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_stems(images: list[str], out: Path) -> dict[str, Path]:
    """Each distinct input's output path without suffix, following `OUTPUT_NAMES`; never two alike."""
    absolute = [Path(os.path.abspath(image)) for image in images]
    common = Path(os.path.commonpath([path.parent for path in absolute]))
    relative = [path.relative_to(common) for path in absolute]
    names = [path.parent / image_stem(path.name) for path in relative]
    while True:  # relative paths are unique, so each round ends at least one clash for good
        counts = Counter(names)
        clashing = [i for i, name in enumerate(names) if counts[name] > 1 and name != relative[i]]
        if not clashing:
            break
        for i in clashing:
            names[i] = relative[i]
    return {image: out / name for image, name in zip(images, names)}


def check_no_input_overwritten(stems: dict[str, Path], out: Path, kind: str) -> None:
    """Refuse a run whose results would replace one of its own input files."""
    inputs = {Path(image).resolve(): image for image in stems}
    outputs = [Path(f"{stem}{suffix}") for stem in stems.values() for suffix in OUTPUT_SUFFIXES[kind]]
    outputs += [out / COCO_FILE] if kind == "coco" else []
    for output in outputs:
        if output.resolve() in inputs:
            raise OptionError(
                f"The results would replace the input {inputs[output.resolve()]} (it is named like a result "
                f"file in --out {out}). Choose another --out folder, or rename that input."
            )


def prepare_out_dir(out: Path) -> None:
    """Create --out and prove it is writable before the model loads, so a typo costs no waiting."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file, not a folder. Pass a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OptionError(
            f"Cannot write to --out {out}: {exc.strerror or exc}. Pass a folder you can write to "
            "(it is created if missing)."
        ) from exc


@contextmanager
def output_errors(what: str, out: Path):
    """Turn a failed write (disk full, a folder where a file should go) into a setup error."""
    try:
        yield
    except OSError as exc:
        raise OptionError(
            f"Cannot write the results of {what} under --out {out}: {exc}. Make room there (disk space, "
            "permissions, nothing in the way) or pass another --out folder."
        ) from exc


def run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from promptseg.errors import ImageError
    from promptseg.results import ensure_prompt_list

    visual = visual_prompts(args)
    if visual is None and not args.prompts:
        raise OptionError("No prompt given: pass -p PROMPT (a noun phrase such as 'red car'; repeat for several), "
                          "or one object's --point X,Y and/or --box X0,Y0,X1,Y1.")
    if visual is None:
        ensure_prompt_list(args.prompts)
    options = segment_options(args)  # a bad option fails before the model loads
    if is_video_run(args):
        if args.ray is not None:
            raise OptionError("--ray segments images: segment videos without it (one video runs on one machine).")
        return run_video(args, options)
    images, repeated = distinct_files(expand_inputs(args.images))
    stems = output_stems(images, args.out)
    kind = "stack" if args.stack else args.format
    check_no_input_overwritten(stems, args.out, kind)
    prepare_out_dir(args.out)
    for path in repeated:
        print(f"{path} was given more than once: segmented once", file=sys.stderr)
    if args.ray is not None:
        return run_segment_on_ray(args, options, images, stems, kind)
    segmenter = load_from_args(args)
    query = segmenter.query(args.prompts, options) if visual is None else None
    coco = CocoWriter(args.prompts if visual is None else ["object"])
    failed = []
    bar = tqdm(images, desc="Segmenting", unit="image", disable=None)
    for path in bar:
        bar.set_postfix_str(Path(path).name)
        try:
            if kind == "stack":
                write_stack(segmenter, path, stems[path], args, options)
                continue
            rgb, result = segment_file(segmenter, path, query, options, visual)
        except ImageError as exc:
            failed.append(path)
            tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        if kind == "coco":
            coco.add(path, result)
        else:
            with output_errors(path, args.out):
                write_result(path, rgb, result, stems[path], kind)
        tqdm.write(f"{path}: {len(result)} instance(s) [embedding {result.embedding_source}]", file=sys.stderr)
    if kind == "coco":
        with output_errors("the COCO file", args.out):
            (args.out / COCO_FILE).write_text(json.dumps(coco.document()))
    print(f"Wrote results for {len(images) - len(failed)} image(s) to {args.out}")
    if failed:
        print(f"{len(failed)} image(s) skipped: {', '.join(map(str, failed))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def run_segment_on_ray(args: argparse.Namespace, options, images: list[str], stems: dict[str, Path], kind: str) -> int:
    """`run_segment` on Ray actors (`promptseg.distributed.segment_on_ray`): the records come back as
    results and go through the same writers, the COCO file in the order of the inputs."""
    from tqdm import tqdm

    from promptseg.distributed import record_to_result, segment_on_ray
    from promptseg.images import load_image

    if visual_prompts(args) is not None or kind == "stack":
        raise OptionError("--ray segments images with text prompts: leave out --point, --box and --stack "
                          "(or leave out --ray).")
    if args.actors < 1:
        raise OptionError(f"--actors takes a whole number of at least 1, not {args.actors}.")
    gpus = args.device.startswith("cuda")  # one GPU per actor; Ray picks which (it sets CUDA_VISIBLE_DEVICES)
    records = segment_on_ray(
        [{"id": path, "image": os.path.abspath(path)} for path in images], args.prompts, model=args.model,
        actors=args.actors, address=args.ray or None, num_gpus_per_actor=1 if gpus else 0,
        device="cuda" if gpus else (None if args.device == "auto" else args.device), dtype=args.dtype,
        cache_dir=False if args.no_cache else args.cache_dir, clip=args.clip, max_pixels=args.max_pixels,
        options=options,
    )
    done, failed = {}, []
    for record in records:
        path = record["id"]
        if record["error"]:
            failed.append(path)
            tqdm.write(f"skipped {path}: {record['error']}", file=sys.stderr)
            continue
        result = record_to_result(record)
        if kind == "coco":
            done[path] = result
        else:
            rgb = load_image(path, options.pixels.percentiles, options.pixels.channels, args.max_pixels) if kind == "png" else None
            with output_errors(path, args.out):
                write_result(path, rgb, result, stems[path], kind)
        tqdm.write(f"{path}: {len(result)} instance(s) [embedding {result.embedding_source}]", file=sys.stderr)
    if kind == "coco":
        coco = CocoWriter(args.prompts)
        for path in images:
            if path in done:
                coco.add(path, done[path])
        with output_errors("the COCO file", args.out):
            (args.out / COCO_FILE).write_text(json.dumps(coco.document()))
    failed.sort(key=images.index)
    print(f"Wrote results for {len(images) - len(failed)} image(s) to {args.out}")
    if failed:
        print(f"{len(failed)} image(s) skipped: {', '.join(map(str, failed))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def is_video_run(args: argparse.Namespace) -> bool:
    """Whether the inputs are videos (by suffix, or every input with --video); refuses a mix with images
    and video-only flags without a video."""
    from promptseg.video import is_video_path

    videos = [path for path in args.images if args.video or is_video_path(path)]
    if videos and len(videos) != len(args.images):
        raise OptionError(
            f"{videos[0]} is a video but {next(p for p in args.images if p not in videos)} is not: segment videos "
            "and images in separate runs (or pass --video to read folders and TIFFs as videos)."
        )
    if not videos and (args.stride is not None or args.frames is not None):
        raise OptionError("--stride and --frames apply to videos: give a video file (.mp4, .mov, ...), or pass "
                          "--video to read a folder of frames or a TIFF time series as one.")
    return bool(videos)


def run_video(args: argparse.Namespace, options) -> int:
    """Segment each video with SAM 3's video model; write per-frame label PNGs, a label TIFF and the
    tracking JSON (see docs/video.md)."""
    from tqdm import tqdm

    from promptseg.errors import ImageError

    if visual_prompts(args) is not None:
        raise OptionError("--point and --box segment one object in an image; for a video give text prompts with -p.")
    videos, _ = distinct_files(args.images)
    stems = output_stems(videos, args.out)
    prepare_out_dir(args.out)
    segmenter = load_from_args(args)
    failed = []
    for path in videos:
        bar = tqdm(desc=Path(path).name, unit="frame", disable=None, leave=False)

        def progress(total: int, advance: int) -> None:
            bar.total = total
            bar.update(advance)

        try:
            result = segmenter.segment_video(path, args.prompts, frames=args.frames, stride=1 if args.stride is None else args.stride,
                                             options=options, progress=progress)
        except ImageError as exc:
            failed.append(path)
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        finally:
            bar.close()
        stem = stems[path]
        with output_errors(path, args.out):
            result.save_label_pngs(stem)
            result.save_label_tiff(f"{stem}.labels.tif")
            result.save_tracking_json(f"{stem}.tracks.json")
        print(f"{path}: {len(result)} frame(s), {len(result.tracks())} object(s) [embeddings "
              f"{result.info['embedding_source']}]", file=sys.stderr)
    print(f"Wrote results for {len(videos) - len(failed)} video(s) to {args.out}")
    if failed:
        print(f"{len(failed)} video(s) skipped: {', '.join(map(str, failed))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def segment_file(segmenter, path: str, query, options, visual: dict | None = None):
    """The image's RGB pixels (kept for the overlay) and its result: the segmenter's stages one by one,
    or, with `visual` prompts, the one object they point at."""
    rgb = segmenter.load(path, options.pixels)
    if visual is not None:
        result = segmenter.segment_object(rgb, options=options, **visual)
        result.source = str(path)
        return rgb, result
    return rgb, segmenter.segment_rgb(rgb, query, options)


def write_result(path: str, rgb, result, stem: Path, kind: str) -> None:
    """Write one image's files: ``STEM.labels.png`` + ``STEM.overlay.png``, or ``STEM.json``."""
    from promptseg.render import overlay, save_png

    stem.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png":
        save_png(result.to_label_image(dtype="uint16" if len(result) < 65536 else "int32"), f"{stem}.labels.png")
        save_png(overlay(rgb, result), f"{stem}.overlay.png")
    else:
        record = result.to_dict()
        record["source"] = str(path)
        Path(f"{stem}.json").write_text(json.dumps(record, indent=1))


class CocoWriter:
    """Collects every image's instances into one COCO results document (``results.coco.json``)."""

    def __init__(self, prompts: list[str]) -> None:
        self.categories: dict[str, int] = {}
        for prompt in prompts:
            self.categories.setdefault(" ".join(prompt.split()), len(self.categories) + 1)
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, path: str, result) -> None:
        image_id = len(self.images) + 1
        height, width = result.image_size
        self.images.append({"id": image_id, "file_name": str(path), "height": height, "width": width})
        for record in result.to_coco(image_id=image_id, category_ids=self.categories):
            record.pop("category_name")
            record["id"] = len(self.annotations) + 1
            self.annotations.append(record)

    def document(self) -> dict:
        categories = [{"id": i, "name": n} for n, i in self.categories.items()]
        return {"images": self.images, "annotations": self.annotations, "categories": categories}


def write_stack(segmenter, path: str, stem: Path, args: argparse.Namespace, options) -> None:
    """Segment a multi-page TIFF slice by slice; write its label volume as ``STEM.labels.tif``."""
    import tifffile
    from tqdm import tqdm

    bar = tqdm(desc=Path(path).name, unit="slice", disable=None, leave=False)

    def progress(total: int, advance: int) -> None:
        bar.total = total
        bar.update(advance)

    link = args.link if args.link is not None else False
    result = segmenter.segment_stack(path, args.prompts, options, axes=args.axes, link=link, progress=progress)
    bar.close()
    volume = result.to_label_volume(dtype="uint16" if result.num_objects < 65536 else "int32")
    with output_errors(path, args.out):
        stem.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(f"{stem}.labels.tif", volume, metadata={"axes": "ZYX"}, compression="zlib")
    sys.stderr.write(f"{path}: {len(result)} slice(s), {result.num_objects} object(s)\n")


def run_suggest(args: argparse.Namespace) -> int:
    from promptseg.clip.scorer import load_clip
    from promptseg.images import load_image
    from promptseg.clip.suggest import suggest_prompts

    scorer = load_clip(args.clip, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    for phrase, probability in suggest_prompts(scorer, load_image(args.image), args.vocabulary, args.k):
        print(f"{probability:.3f}\t{phrase}")
    return EXIT_OK


def run_cache(args: argparse.Namespace) -> int:
    from promptseg.cache import DiskCache, default_cache_dir
    from promptseg.remote_cache import local_dir_for

    shared = args.cache_dir if args.cache_dir and "://" in args.cache_dir else None
    disk = DiskCache(local_dir_for(shared) if shared else (args.cache_dir or default_cache_dir()))
    if shared:  # the store is shared with other machines: only this machine's copy is shown or cleared here
        print(f"{shared} is a shared store: this is this machine's local tier of it; manage the store itself "
              "with its own tools (e.g. aws s3 rm, a lifecycle rule).")
    if disk.root.exists() and not disk.root.is_dir():
        raise OptionError(f"The embedding cache {disk.root} is a file, not a folder. Point --cache-dir "
                          "(or PROMPTSEG_CACHE_DIR) at the cache folder.")
    if not disk.root.exists():
        print(f"No embedding cache at {disk.root} yet: nothing to {'clear' if args.action == 'clear' else 'show'}")
        return EXIT_OK
    if args.action == "info":
        files = disk.files()
        size = sum(p.stat().st_size for p in files)
        print(f"Embedding cache: {disk.root}")
        print(f"  {len(files)} embedding(s), {size / 1024**2:.1f} MiB")
        return EXIT_OK
    removed = disk.clear()
    print(f"Removed {removed} embedding(s) from {disk.root}")
    return EXIT_OK


def run_doctor(args: argparse.Namespace) -> int:
    from promptseg.doctor import run_checks

    return EXIT_OK if run_checks(args.model) else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return args.func(args)
    except PromptsegError as exc:
        print(f"promptseg: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("promptseg: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback for the report, and an exit code of its own
        traceback.print_exc()
        print("promptseg: unexpected error (a bug): please report it with the traceback above",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
