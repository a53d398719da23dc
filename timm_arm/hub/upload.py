""" Publish a converted folder to the Hugging Face Hub, uploading only what changed.

Each local file is compared with the Hub's copy on the target revision: LFS files (the weights) by their sha256,
the others by their git blob id. Only new or changed files go into the commit; when nothing changed no commit is
made. Files on the Hub that are absent locally are left alone. The token comes from huggingface_hub's usual
places (HF_TOKEN, or `hf auth login`).
"""
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .source import HubError, list_files, sha256_file

__all__ = ['publish', 'plan_upload', 'place_in_cache']

_REQUIRED = ('model.safetensors', 'config.json', 'README.md')
_PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.pkl', '.pickle', '.ckpt', '.tar')


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _same(local: Path, remote: Any) -> bool:
    if remote is None:
        return False
    lfs = getattr(remote, 'lfs', None)
    if lfs is not None:
        return lfs.size == local.stat().st_size and lfs.sha256 == sha256_file(local)
    return getattr(remote, 'blob_id', None) == _git_blob_id(local)


def _check_folder(folder: Path) -> List[str]:
    if not folder.is_dir():
        raise HubError(folder, 'no such folder')
    files = [p.as_posix() for p in list_files(folder)]
    missing = [name for name in _REQUIRED if name not in files]
    if missing:
        raise HubError(folder, f'missing {", ".join(missing)}: convert a checkpoint with `timm-arm-hub convert` first')
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(folder, f'refusing to publish pickled files ({", ".join(pickles)}); publish safetensors only')
    try:
        json.loads((folder / 'config.json').read_text())
    except ValueError as e:
        raise HubError(folder / 'config.json', f'not valid JSON ({e})') from None
    return files


def _remote_files(api: HfApi, repo_id: str, revision: Optional[str]) -> Optional[Dict[str, Any]]:
    """path -> RepoFile of the Hub repo; None when the repo (or revision) does not exist yet."""
    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
                if hasattr(f, 'blob_id')}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None


def plan_upload(folder: Path, files: List[str], remote: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """path -> 'new', 'changed' or 'unchanged'."""
    plan = {}
    for name in files:
        if remote is None or name not in remote:
            plan[name] = 'new'
        else:
            plan[name] = 'unchanged' if _same(folder / name, remote[name]) else 'changed'
    return plan


def publish(
        folder: Any,
        repo_id: str,
        api: Optional[HfApi] = None,
        revision: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
        log: Callable[[str], None] = print,
) -> List[str]:
    """Upload the new and changed files of `folder` to the Hub model repo `repo_id`; returns their paths.

    Args:
        api: An HfApi (default: HfApi() with the usual token).
        revision: Branch to commit to (default: main).
        private: Create the repo as private if it does not exist.
        dry_run: Only report what would be uploaded (reading the Hub's file list if reachable).
    """
    folder = Path(folder)
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise HubError(repo_id, 'repo id must be <owner>/<name>')
    files = _check_folder(folder)
    if api is None:
        from timm_arm import __version__
        api = HfApi(library_name='timm-arm', library_version=__version__)

    try:
        remote = _remote_files(api, repo_id, revision)
    except Exception as e:  # network, auth: fatal unless only planning
        if not dry_run:
            raise HubError(repo_id, f'cannot read the Hub repo ({type(e).__name__}: {e})') from None
        log(f'dry run: Hub repo not readable ({type(e).__name__}), listing every file as new')
        remote = None
    plan = plan_upload(folder, files, remote)
    target = f'{repo_id}' + (f'@{revision}' if revision else '')
    for name, state in plan.items():
        size = (folder / name).stat().st_size
        log(f'  {state:9s} {name} ({size:,} bytes)')
    upload = [name for name, state in plan.items() if state != 'unchanged']
    if not upload:
        log(f'{target} is up to date: nothing to upload')
        return []
    if dry_run:
        log(f'dry run: would upload {len(upload)} file(s) to {target}' + (' (new repo)' if remote is None else ''))
        return upload

    if remote is None:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in upload]
    info = api.create_commit(
        repo_id, operations=operations, revision=revision,
        commit_message=commit_message or f'Upload {", ".join(upload)} with timm-arm-hub')
    log(f'uploaded {len(upload)} file(s) to {target}: {getattr(info, "commit_url", info)}')
    oid = getattr(info, 'oid', None)
    if oid:
        log(f"pin it: HUB_REVISIONS['{repo_id.split('/')[-1]}'] = '{oid}' in timm_arm/models/arm_mamba.py "
            f"(hf_hub_id {repo_id}@{oid})")
    return upload


def _default_repo_id(folder: Path) -> str:
    """The Hub repo of the tag the folder is named after (arm_mamba_base.arm_in1k -> its hf_hub_id)."""
    from timm.models import get_pretrained_cfg

    from timm_arm.models.arm_mamba import HUB_ORG
    try:
        cfg = get_pretrained_cfg(folder.name)
    except RuntimeError:
        cfg = None
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f'{HUB_ORG}/{folder.name}'


def place_in_cache(
        folder: Any,
        repo_id: Optional[str] = None,
        cache_dir: Optional[Any] = None,
        log: Callable[[str], None] = print,
) -> Path:
    """Lay a converted folder into the local Hugging Face cache as hf_hub_download leaves a download of it
    (content-addressed blobs: sha256 for the weights, git blob ids for the rest; a snapshot of relative links;
    refs/main naming the snapshot), so that `pretrained=True` on its tag loads it offline (HF_HUB_OFFLINE=1).

    The snapshot's revision is derived from the files' hashes: placing the same folder again changes nothing.
    Returns the snapshot folder.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(folder)
    files = _check_folder(folder)
    repo_id = repo_id or _default_repo_id(folder)
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    ids = {name: sha256_file(folder / name) if name.endswith('.safetensors') else _git_blob_id(folder / name)
           for name in files}
    revision = hashlib.sha1(json.dumps(sorted(ids.items())).encode()).hexdigest()
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type='model')
    snapshot = repo / 'snapshots' / revision
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, blob_id in ids.items():
        blob = repo / 'blobs' / blob_id
        if not blob.exists():
            tmp = blob.with_name(blob.name + '.incomplete')
            tmp.write_bytes((folder / name).read_bytes())
            tmp.replace(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(*(['..'] * (len(Path(name).parts) + 1)), 'blobs', blob_id))
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(revision)
    log(f'placed {folder} in {cache} as {repo_id} (revision {revision[:12]})')
    return snapshot
