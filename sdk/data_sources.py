"""Data sources: turn what a spec points at (local paths, s3:// URIs, image archives) into local paths.

A job's child process calls `resolve_data_sources` before the action runs; the spec it hands to the action then
holds only local files and folders. Everything lands in one cache folder (default `<workspace>/cache/`):
  s3/<bucket>/<key...>      objects and prefixes downloaded with boto3
  archives/<sha256>/        archives extracted once, keyed by content

Archives are checked member by member before a single byte is written, because `tarfile`'s own filters stop at
the first bad member and leave the earlier ones on disk.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping

from sdk.errors import SkillBankError
from sdk.spec import expand_key, set_path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


class DataSourceError(SkillBankError):
    """A data source that cannot be fetched or unpacked safely."""


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def is_s3(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


# ---------------------------------------------------------------------------------------------------------------
# archives


# Symlinks followed while resolving one path before it counts as a loop (Linux's own limit is 40).
MAX_LINK_HOPS = 40


class _Escape(Exception):
    """A path that, with the archive's earlier links followed, leaves the extraction folder."""


def _resolve(parts: Iterable[str], links: dict[str, str], follow_last: bool) -> list[str]:
    """The components of an archive path below the extraction folder, following the symlinks met so far in the
    archive (`links`: normalised member path -> link target) the way the filesystem will once they exist.
    Raises _Escape when the path leaves the folder, points at an absolute path or loops."""
    resolved: list[str] = []
    queue = list(parts)
    hops = 0
    while queue:
        part = queue.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise _Escape("leaves the extraction folder")
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None and (queue or follow_last):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise _Escape("a loop of links")
            if target.startswith("/"):
                raise _Escape(f"reaches the absolute path {target!r}")
            resolved.pop()  # a symlink resolves relative to its own folder
            queue = list(PurePosixPath(target).parts) + queue
    return resolved


def _member_problem(member: tarfile.TarInfo, links: dict[str, str]) -> str | None:
    """Why `member` may not be extracted, or None when it is safe. `links` holds the symlinks of the members
    before it (extraction creates them first, so later members are written through them); a safe symlink is
    added to it."""
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return "path with '..'"
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return f"unsupported member type {member.type!r}"
    try:
        # where the member itself lands: its folders may be links made by earlier members
        folder = _resolve(parts[:-1], links, follow_last=True)
    except _Escape as escape:
        return f"written through earlier links that escape the archive ({escape})"
    if member.issym() or member.islnk():
        target = member.linkname
        if not target or target.startswith("/"):
            return f"link to absolute path {target!r}"
        # A symlink resolves relative to its own folder, a hard link relative to the archive root.
        base = folder if member.issym() else []
        try:
            _resolve([*base, *PurePosixPath(target).parts], links, follow_last=True)
        except _Escape as escape:
            return f"link escaping the archive ({target!r} {escape}, following the archive's links)"
        if member.issym():
            links["/".join([*folder, parts[-1]])] = target
            return None
    # a file or folder replaces a link of the same name
    links.pop("/".join([*folder, parts[-1]]), None)
    return None


def _late_escape(member: tarfile.TarInfo, links: dict[str, str]) -> str | None:
    """Why the symlink `member` escapes once every link of the archive exists (a later link can move an earlier
    link's target: `x -> d/e/../..` is inside until `d -> .` arrives), or None."""
    parts = PurePosixPath(member.name).parts
    try:
        folder = _resolve(parts[:-1], links, follow_last=True)
        _resolve([*folder, *PurePosixPath(member.linkname).parts], links, follow_last=True)
    except _Escape as escape:
        return f"link escaping the archive ({member.linkname!r} {escape}, following the archive's links)"
    return None


def check_archive(path: Path) -> list[tarfile.TarInfo]:
    """Every member of the archive, or DataSourceError naming the first unsafe one. Writes nothing."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as exc:
        raise DataSourceError(f"{path}: not a readable tar archive ({exc}). Fix: give a .tar/.tar.gz of the images.")
    links: dict[str, str] = {}
    problems = ((m, _member_problem(m, links)) for m in members)
    late = ((m, _late_escape(m, links)) for m in members if m.issym())
    for member, problem in chain(problems, late):
        if problem:
            raise DataSourceError(
                f"{path}: refused the whole archive, member {member.name!r} is unsafe ({problem}). "
                "Fix: rebuild the archive with relative paths inside one folder and no links or devices."
            )
    return members


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_archive(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Extract `path` once into `<cache_dir>/archives/<sha256>/` and return that folder.

    Safe under concurrency: each caller extracts into its own temp folder and renames it into place; a caller
    that loses the race discards its copy and uses the winner's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: archive not found. Fix: check the path in the spec.")
    root = Path(cache_dir) / "archives"
    final = root / _sha256(path)
    if final.is_dir():
        return final
    check_archive(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        with tarfile.open(path, "r:*") as tar:
            # The "data" filter repeats our checks and also drops setuid bits and odd permissions.
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# S3


def _safe_target(dest: Path, relative: str) -> Path:
    """`dest / relative`, refusing anything that would land outside `dest`."""
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or ".." in parts:
        raise DataSourceError(
            f"S3 key part {relative!r} would be written outside {dest}; refused. "
            "Fix: rename the object so its key has no '..' or leading '/' components."
        )
    return dest.joinpath(*parts)


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise DataSourceError(f"{uri}: no bucket name. Fix: use s3://bucket/prefix.")
    return bucket, key


def fetch_s3(uri: str, cache_dir: str | os.PathLike, log: Callable[[str], None] = print,
             page_size: int = 1000) -> Path:
    """Download an object or every object under a prefix into `<cache_dir>/s3/<bucket>/<key>`; return the path.

    boto3's credential chain and AWS_ENDPOINT_URL(_S3) decide where it connects; credentials are never logged.
    Files already cached with the same size are not downloaded again.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split_uri(uri)
    bucket_dir = Path(cache_dir) / "s3" / bucket
    client = boto3.client("s3")
    prefix = key.rstrip("/")
    try:
        objects = _list_prefix(client, bucket, f"{prefix}/" if prefix else "", page_size)
        if objects:
            dest = _safe_target(bucket_dir, prefix) if prefix else bucket_dir
            for obj_key, size in objects:
                _download(client, bucket, obj_key, _safe_target(dest, obj_key[len(prefix) + 1 if prefix else 0:]),
                          size)
            log(f"data source {uri}: {len(objects)} object(s) in {dest}")
            return dest
        if not prefix:
            raise DataSourceError(f"{uri}: the bucket is empty. Fix: check the bucket name and its contents.")
        head = client.head_object(Bucket=bucket, Key=prefix)
        target = _safe_target(bucket_dir, prefix)
        _download(client, bucket, prefix, target, head["ContentLength"])
        log(f"data source {uri}: 1 object in {target}")
        return target
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise DataSourceError(f"{uri}: S3 request failed ({code}). Fix: check the URI and that your credentials "
                              "can read it (AWS_PROFILE / AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).") from None
    except BotoCoreError as exc:
        raise DataSourceError(f"{uri}: cannot reach S3 ({type(exc).__name__}). Fix: check AWS_ENDPOINT_URL, the "
                              "region and the credential settings.") from None


def _list_prefix(client, bucket: str, prefix: str, page_size: int) -> list[tuple[str, int]]:
    found = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                             PaginationConfig={"PageSize": page_size})
    for page in pages:
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                found.append((obj["Key"], obj["Size"]))
    return found


def _download(client, bucket: str, key: str, target: Path, size: int) -> None:
    if target.is_file() and target.stat().st_size == size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    client.download_file(bucket, key, str(tmp))
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------------------
# dataset folders given by role (`job create --dataset ROLE=PATH`)


def dataset_values(declared: Mapping[str, Any], datasets: Mapping[str, Any]) -> dict[str, Any]:
    """{spec key: value} filled from dataset folders given by role, as skill_info's data_sources describe them.

    datasets: {role: path or [paths]}; a path is a local folder or s3://bucket/prefix. An archive field
    (runtime: extracted_folder, e.g. images.tar.gz) also accepts the folder it unpacks to (images/).
    """
    roles = sorted({source.source for source in (declared or {}).values()})
    paths = {}
    for role, given in datasets.items():
        if role not in roles:
            raise SkillBankError(f"dataset role {role!r}: this action takes {', '.join(roles) or 'no datasets'}."
                                 " Fix: --dataset ROLE=PATH with one of those roles.")
        paths[role] = [given] if isinstance(given, (str, os.PathLike)) else list(given)
    values: dict[str, Any] = {}
    for key, source in (declared or {}).items():
        if source.source not in paths:
            continue
        folders = paths[source.source]
        if not source.list and len(folders) != 1:
            raise SkillBankError(f"dataset role {source.source!r} fills {key}, which takes one dataset; "
                                 f"got {len(folders)}. Fix: give --dataset {source.source}=PATH once.")
        entries = [_dataset_entry(source, str(folder)) for folder in folders]
        values[key] = entries if source.list else entries[0]
    return values


def _dataset_entry(source, folder: str) -> Any:
    where = f"dataset {source.source}={folder}"
    if is_s3(folder):
        folder = folder.rstrip("/")
        names = _s3_names(folder)
    else:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise SkillBankError(f"{where}: not a folder. Fix: give the folder that holds the role's files "
                                 "(see the data table in skills/grounding-dino/SKILL.md).")
        folder = str(path)
        names = {p.name + ("/" if p.is_dir() else "") for p in path.iterdir()}
    files = {None: source.file} if source.file is not None else dict(source.fields)
    entry, missing = {}, []
    for field_name, wanted in files.items():
        choices = [wanted.file]
        if wanted.runtime == "extracted_folder" and is_archive(wanted.file):
            choices.append(_archive_folder(wanted.file) + "/")
        found = next((name for name in choices if name in names), None)
        if found is not None:
            entry[field_name] = f"{folder}/{found.rstrip('/')}"
        elif not wanted.optional:
            missing.append(" or ".join(choices))
    if missing:
        raise SkillBankError(f"{where}: holds no {', no '.join(missing)}. Fix: put the files there, or set the "
                             "spec keys yourself instead of using --dataset.")
    return entry[None] if source.file is not None else entry


def _archive_folder(name: str) -> str:
    lowered = name.lower()
    suffix = next(s for s in ARCHIVE_SUFFIXES if lowered.endswith(s))
    return name[:-len(suffix)]


def _s3_names(uri: str) -> set[str]:
    """File names and first-level folders (with a trailing /) directly under an S3 prefix."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split_uri(uri)
    prefix = f"{prefix}/" if prefix else ""
    try:
        keys = _list_prefix(boto3.client("s3"), bucket, prefix, 1000)
    except (ClientError, BotoCoreError) as exc:
        raise DataSourceError(f"{uri}: cannot list the dataset ({type(exc).__name__}). Fix: check the URI and that "
                              "your credentials can read it (AWS_PROFILE / AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).") \
            from None
    names = set()
    for key, _ in keys:
        head, sep, _rest = key[len(prefix):].partition("/")
        names.add(head + sep)
    return names


# ---------------------------------------------------------------------------------------------------------------
# spec walking


def spec_paths(spec: dict) -> Iterable[tuple[str, str]]:
    """Every (dotted path, string value) leaf of the spec, list items included."""
    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{prefix}[{i}]")
        elif isinstance(node, str):
            yield prefix, node
    yield from walk(spec, "")


def data_source_keys(declared: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten an action's skill_info data sources into {spec key pattern: SourceFile (file, runtime)}.

    A section with `fields` yields `section.field`, or `section[*].field` when it is a list of sections.
    """
    flat = {}
    for key, source in (declared or {}).items():
        if source.file is not None:
            flat[key] = source.file
        for name, source_file in source.fields.items():
            flat[f"{key}{'[*]' if source.list else ''}.{name}"] = source_file
    return flat


def extracted_keys(declared: Mapping[str, Any]) -> list[str]:
    """The key patterns whose archives are unpacked before the action runs (runtime: extracted_folder)."""
    return [k for k, f in data_source_keys(declared).items() if f.runtime == "extracted_folder"]


def resolve_data_sources(spec: dict, extract_keys: Iterable[str], cache_dir: str | os.PathLike,
                         log: Callable[[str], None] = print) -> dict:
    """Fetch every s3:// value in `spec`, then extract archives at the `extract_keys` (runtime: extracted_folder).

    Returns the spec with local paths in place (the input is modified and returned).
    """
    for dotted, value in list(spec_paths(spec)):
        if is_s3(value):
            set_path(spec, dotted, str(fetch_s3(value, cache_dir, log)))
    for pattern in extract_keys:
        for dotted, value in expand_key(spec, pattern):
            if isinstance(value, list):
                set_path(spec, dotted, [_extracted(v, dotted, cache_dir, log) for v in value])
            elif isinstance(value, str):
                set_path(spec, dotted, _extracted(value, dotted, cache_dir, log))
    return spec


def _extracted(value: Any, key: str, cache_dir, log) -> Any:
    if not (isinstance(value, str) and is_archive(value) and Path(value).is_file()):
        return value
    folder = extract_archive(value, cache_dir)
    log(f"data source {key}: extracted {value} into {folder}")
    return str(folder)
