#!/usr/bin/env python
"""Large wheels for the offline GPU machine, carried in parts (issue 26 item 4): ``kit.sh prepare-big`` and
``kit.sh assemble`` call this.

The GPU machine takes at most 64 MiB of files per command and keeps ``/tmp`` only between commands that follow each
other closely, so a 300 MB wheel travels as parts over consecutive commands:

    prepare (CPU, PyPI)   download -> <kit>/big/files/ (kept: never downloaded twice), split into parts of
                          < --part-mib, pack the parts into bundles <kit>/big/carry/NN/ of < --bundle-mib (one
                          bundle per GPU command), write <kit>/big/manifest.json (sha256 of every part and file)
    assemble (GPU)        copy the parts this command carried into --tmp (each part's sha256 checked), say which
                          bundles are still missing; once a group's files are all there: join them in --tmp, check
                          each file's sha256, install the group's wheels into --site (no index, no dependencies),
                          build its sdists against the image's torch (timed) and split each built wheel into
                          --built-part-mib parts under --out, with their manifest, for a later run to carry
    pack (CPU)            split and bundle local files (a group named ``local``): what the CPU tests use

Groups: ``te`` (transformer-engine-cu13's wheel, transformer-engine-torch's sdist, their missing dependencies) and
``vllm`` (the newest vLLM whose wheel pins the image's torch, and its dependencies missing from the image).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20
IMAGE_TORCH = '2.11.0'
# what the image has besides tests/gpu/image_packages.txt, with versions (KINDS.md's pip list): what vLLM's
# requirements are checked against, and the stubs the resolver uses in place of the CUDA stack
IMAGE_VERSIONS = {'torch': IMAGE_TORCH, 'torchaudio': '2.11.0', 'torchvision': '0.26.0', 'triton': '3.6.0',
                  'onnx': '1.23.1', 'onnxscript': '0.7.2', 'onnx-ir': '1.0.0'}
STUBBED = ('torch', 'torchaudio', 'torchvision', 'triton')  # their nvidia-* pins are the image's, not PyPI's
TE_VERSION = '2.20.2'
VLLM_CANDIDATES = ('0.33.0', '0.32.0', '0.31.0', '0.30.0', '0.29.0', '0.28.0', '0.27.1', '0.27.0', '0.26.0',
                   '0.25.1', '0.25.0', '0.24.0')
GLIBC = [f'manylinux_2_{g}_x86_64' for g in range(39, 16, -1)] + ['manylinux2014_x86_64', 'linux_x86_64']
PLATFORM_ARGS = ['--only-binary=:all:', '--python-version', '3.12', '--implementation', 'cp'] + [
    a for p in GLIBC for a in ('--platform', p)]
MARKER_ENV = dict(python_version='3.12', python_full_version='3.12.3', platform_machine='x86_64',
                  platform_system='Linux', sys_platform='linux', os_name='posix', implementation_name='cpython',
                  platform_python_implementation='CPython', extra='')


def log(msg: str):
    print(f'big: {msg}', flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(4 * MiB), b''):
            h.update(block)
    return h.hexdigest()


def norm(name: str) -> str:
    return name.lower().replace('_', '-').replace('.', '-')


# ---------------------------------------------------------------------------------------------- split, join, pack
def split_file(path: str, part_bytes: int, dest: str) -> List[Dict]:
    """``path`` cut into ``<name>.partKKK`` files of at most ``part_bytes`` in ``dest``: [{name, size, sha256}]."""
    if part_bytes <= 0:
        raise ValueError(f'part size must be positive, got {part_bytes} bytes')
    os.makedirs(dest, exist_ok=True)
    parts, base, k = [], os.path.basename(path), 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(part_bytes)
            if not data and k:
                break
            name = f'{base}.part{k:03d}'
            with open(os.path.join(dest, name), 'wb') as out:
                out.write(data)
            parts.append(dict(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
            k += 1
            if len(data) < part_bytes:
                break
    return parts


def join_parts(entry: Dict, parts_dir: str, dest_dir: str) -> str:
    """The file of a manifest ``entry`` rebuilt from its parts in ``parts_dir`` into ``dest_dir``; raises when a part
    is missing or the whole file's sha256 differs from the manifest's."""
    missing = [p['name'] for p in entry['parts'] if not os.path.exists(os.path.join(parts_dir, p['name']))]
    if missing:
        raise FileNotFoundError(f"{entry['name']}: parts missing: {', '.join(missing)}")
    os.makedirs(dest_dir, exist_ok=True)
    out = os.path.join(dest_dir, entry['name'])
    with open(out + '.joining', 'wb') as f:
        for p in entry['parts']:
            with open(os.path.join(parts_dir, p['name']), 'rb') as part:
                shutil.copyfileobj(part, f, 4 * MiB)
    got = sha256(out + '.joining')
    if got != entry['sha256']:
        os.remove(out + '.joining')
        raise ValueError(f"{entry['name']}: sha256 {got} after joining, the manifest says {entry['sha256']}")
    os.replace(out + '.joining', out)
    return out


def bundle(parts: List[Dict], bundle_bytes: int) -> List[List[Dict]]:
    """Parts packed, in order, into bundles of at most ``bundle_bytes`` (one GPU command carries one bundle)."""
    bundles: List[List[Dict]] = []
    size = 0
    for p in parts:
        if p['size'] > bundle_bytes:
            raise ValueError(f"part {p['name']} ({p['size']} bytes) is larger than a bundle ({bundle_bytes} bytes)")
        if not bundles or size + p['size'] > bundle_bytes:
            bundles.append([])
            size = 0
        bundles[-1].append(p)
        size += p['size']
    return bundles


def pack(big: str, files: List[Dict], part_mib: float, bundle_mib: float, notes: Dict) -> Dict:
    """Split ``files`` ([{path, groups, kind: wheel|sdist}]) into parts, bundle them under ``big``/carry and write
    ``big``/manifest.json. Returns the manifest."""
    part_bytes, bundle_bytes = int(part_mib * MiB), int(bundle_mib * MiB)
    if part_bytes > bundle_bytes:
        raise ValueError(f'--part-mib {part_mib} is above --bundle-mib {bundle_mib}')
    staging = os.path.join(big, 'parts.tmp')
    shutil.rmtree(staging, ignore_errors=True)
    entries, all_parts = [], []
    for f in files:
        parts = split_file(f['path'], part_bytes, staging)
        entries.append(dict(name=os.path.basename(f['path']), groups=f['groups'], kind=f['kind'],
                            size=os.path.getsize(f['path']), sha256=sha256(f['path']), parts=parts))
        all_parts += parts
    carry = os.path.join(big, 'carry')
    shutil.rmtree(carry, ignore_errors=True)
    for i, b in enumerate(bundle(all_parts, bundle_bytes)):
        d = os.path.join(carry, f'{i:02d}')
        os.makedirs(d)
        for p in b:
            os.replace(os.path.join(staging, p['name']), os.path.join(d, p['name']))
            p['bundle'] = f'{i:02d}'
    shutil.rmtree(staging)
    manifest = dict(created=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), part_mib=part_mib,
                    bundle_mib=bundle_mib, files=entries, notes=notes)
    with open(os.path.join(big, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    nb = len({p['bundle'] for e in entries for p in e['parts']})
    log(f'{len(entries)} files, {sum(e["size"] for e in entries) / MiB:.1f} MiB, {len(all_parts)} parts in {nb} '
        f'bundles under {carry}; manifest {os.path.join(big, "manifest.json")}')
    return manifest


# ---------------------------------------------------------------------------------------------- prepare (CPU)
def pip(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'pip', *args], capture_output=True, text=True, **kw)


def download_wheel(spec: str, dest: str) -> str:
    """One wheel for CPython 3.12 manylinux x86-64 (no dependencies) into ``dest``; kept there: never twice."""
    name, version = spec.split('==')
    for f in os.listdir(dest) if os.path.isdir(dest) else []:
        if f.endswith('.whl') and norm(f.split('-')[0]) == norm(name) and f.split('-')[1] == version:
            return os.path.join(dest, f)
    t0 = time.time()
    r = pip('download', '-q', '--no-deps', *PLATFORM_ARGS, '-d', dest, spec)
    if r.returncode:
        raise RuntimeError(f'pip download {spec}: {r.stderr[-2000:]}')
    path = download_wheel(spec, dest)
    log(f'downloaded {os.path.basename(path)}: {os.path.getsize(path) / MiB:.1f} MiB in {time.time() - t0:.0f} s')
    return path


def wheel_requires(path: str) -> List[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
        text = z.read(meta).decode()
    return [ln.split(':', 1)[1].strip() for ln in text.splitlines() if ln.startswith('Requires-Dist:')]


def newest_vllm_for_torch(dest: str, torch_version: str = IMAGE_TORCH) -> (str, List[Dict]):
    """The newest vLLM (of VLLM_CANDIDATES, newest first) whose wheel's METADATA pins ``torch==torch_version``.
    Every candidate read is recorded in ``dest``/vllm_candidates.json (version, wheel, size, torch pin) and its
    wheel deleted unless chosen: a later prepare reads the record instead of downloading the wheel again."""
    from packaging.requirements import Requirement
    record_path = os.path.join(dest, 'vllm_candidates.json')
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    for v in VLLM_CANDIDATES:
        if v in record and record[v]['torch'] != [f'=={torch_version}']:
            continue
        path = download_wheel(f'vllm=={v}', dest)
        pins = [str(Requirement(r).specifier) for r in wheel_requires(path) if Requirement(r).name == 'torch']
        record[v] = dict(version=v, wheel=os.path.basename(path), size=os.path.getsize(path), torch=pins)
        with open(record_path, 'w') as f:
            json.dump(record, f, indent=1)
        log(f'vllm {v}: torch{pins}')
        if pins == [f'=={torch_version}']:
            return path, [record[k] for k in VLLM_CANDIDATES if k in record]
        os.remove(path)
    raise RuntimeError(f'no vLLM among {VLLM_CANDIDATES} pins torch=={torch_version}: {record}')


def stub_wheel(folder: str, name: str, version: str) -> str:
    """A metadata-only wheel: lets pip's resolver take the image's torch stack as given (never installed)."""
    import base64
    path = os.path.join(folder, f'{name}-{version}-py3-none-any.whl')
    info = f'{name}-{version}.dist-info'
    files = {f'{info}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n'.encode(),
             f'{info}/WHEEL': b'Wheel-Version: 1.0\nGenerator: big.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n'}
    record = ''.join(f'{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()},'
                     f'{len(d)}\n' for p, d in files.items()) + f'{info}/RECORD,,\n'
    with zipfile.ZipFile(path, 'w') as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f'{info}/RECORD', record)
    return path


def present_packages() -> Dict[str, Optional[str]]:
    """Names (normalised) on the GPU machine before assemble, with the version where it is known: the image's
    (image_names.txt; versions only from IMAGE_VERSIONS, read on the machine) and the kit's (pinned). The versions in
    image_packages.txt are stand-ins for the CPU selfcheck, not readings, so they are not used here."""
    have: Dict[str, Optional[str]] = {}
    with open(os.path.join(HERE, 'image_names.txt')) as f:
        have.update({norm(ln.strip()): None for ln in f if ln.strip() and not ln.startswith('#')})
    with open(os.path.join(HERE, 'kit_requirements.txt')) as f:
        for ln in f:
            ln = ln.split('#')[0].strip()
            if '==' in ln:
                n, v = ln.split('==')
                have[norm(n)] = v
    have.update({norm(k): v for k, v in IMAGE_VERSIONS.items()})
    return have


def resolve(roots: Dict[str, List[str]], dest: str, download: bool = True) -> (Dict[str, List[str]], List[Dict]):
    """One resolution (pip's resolver, CPython 3.12 manylinux, the image's torch stack as given) of every group's
    roots together, so that the groups agree on versions. Returns, per group, the wheels its roots need that the GPU
    machine lacks (downloaded into ``dest``), and the conflicts: a requirement of a resolved package that a package
    already on the machine, at its known version, does not meet. A package the machine has is never carried (a
    replacement would shadow the image's for everything); assemble re-checks the requirements there."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
    have = present_packages()
    tmp = tempfile.mkdtemp(prefix='big_resolve_')
    try:
        for name in STUBBED:  # 2.11.0+imagestub sorts above PyPI's 2.11.0 and still meets ==2.11.0
            stub_wheel(tmp, name, IMAGE_VERSIONS[name] + '+imagestub')
        report = os.path.join(tmp, 'report.json')
        every = [r for g in roots.values() for r in g]
        r = pip('install', '--dry-run', '--ignore-installed', *PLATFORM_ARGS, '--find-links', tmp, '--target',
                os.path.join(tmp, 't'), '--report', report, *every,
                *[f'{n}=={IMAGE_VERSIONS[n]}+imagestub' for n in STUBBED])
        if r.returncode:
            raise RuntimeError(f'pip could not resolve {every}: {r.stderr[-3000:]}')
        with open(report) as f:
            installs = json.load(f)['install']
    finally:
        shutil.rmtree(tmp)
    if not download:
        return {}, []
    meta = {canonicalize_name(i['metadata']['name']): i['metadata'] for i in installs}
    deps = {}
    for n, m in meta.items():
        deps[n] = []
        for req in map(Requirement, m.get('requires_dist') or []):
            extras = set(req.extras)
            if req.marker and not req.marker.evaluate(MARKER_ENV):
                continue
            deps[n].append(canonicalize_name(req.name))
            deps[n] += [f'{canonicalize_name(req.name)}[{e}]' for e in extras]
    # extras: a requirement on name[extra] adds that extra's requirements of ``name``
    for n, m in meta.items():
        for req in map(Requirement, m.get('requires_dist') or []):
            if req.marker and 'extra' in str(req.marker):
                for extra in {e for d in deps.values() for e in d if e.startswith(n + '[')}:
                    env = dict(MARKER_ENV, extra=extra[len(n) + 1:-1])
                    if req.marker.evaluate(env):
                        deps.setdefault(extra, []).append(canonicalize_name(req.name))
    conflicts = []
    for n, m in meta.items():
        for req in map(Requirement, m.get('requires_dist') or []):
            if req.marker and not req.marker.evaluate(MARKER_ENV):
                continue
            v = have.get(norm(req.name))
            if v and not req.specifier.contains(Version(v), prereleases=True):
                conflicts.append(dict(package=m['name'], requires=str(req), machine_has=v))
    wanted: Dict[str, List[str]] = {}
    for group, group_roots in roots.items():
        names = set()
        todo = [canonicalize_name(os.path.basename(x).split('-')[0]) if x.endswith('.whl') else
                canonicalize_name(Requirement(x).name) for x in group_roots]
        while todo:
            n = todo.pop()
            if n in names:
                continue
            names.add(n)
            todo += deps.get(n, [])
        names = {n for n in names if '[' not in n and n in meta and n not in STUBBED and norm(n) not in have}
        wanted[group] = [download_wheel(f"{meta[n]['name']}=={meta[n]['version']}", dest) for n in sorted(names)]
    return wanted, conflicts


def fetch_sdist(name: str, version: str, dest: str) -> str:
    """An sdist from PyPI's simple index (JSON form), checked against the index's sha256 (``pip download`` would
    build its metadata, which for transformer-engine-torch needs CUDA and torch)."""
    import urllib.request
    fname = f'{name.replace("-", "_")}-{version}.tar.gz'
    path = os.path.join(dest, fname)
    req = urllib.request.Request(f'https://pypi.org/simple/{name}/',
                                 headers={'Accept': 'application/vnd.pypi.simple.v1+json'})
    with urllib.request.urlopen(req, timeout=60) as r:
        info = next(f for f in json.load(r)['files'] if f['filename'] == fname)
    if not (os.path.exists(path) and sha256(path) == info['hashes']['sha256']):
        with urllib.request.urlopen(info['url'], timeout=600) as r, open(path + '.tmp', 'wb') as f:
            shutil.copyfileobj(r, f)
        os.replace(path + '.tmp', path)
    if sha256(path) != info['hashes']['sha256']:
        raise ValueError(f'{fname}: sha256 differs from the index')
    return path


def prepare(args):
    big = os.path.join(args.kit, 'big')
    files_dir = os.path.join(big, 'files')
    os.makedirs(files_dir, exist_ok=True)
    groups = [g for g in args.groups.split(',') if g]
    roots, sdists, notes = {}, {}, {}
    if 'te' in groups:
        te_core = download_wheel(f'transformer-engine-cu13=={TE_VERSION}', files_dir)
        sdists['te'] = [fetch_sdist('transformer-engine-torch', TE_VERSION, files_dir)]
        # transformer-engine-torch's own requirements (its sdist's PKG-INFO) besides the core wheel, and its build's
        # (pyproject: setuptools, pip, torch; setup.py imports wheel and packaging)
        roots['te'] = [te_core, 'einops', 'onnxscript', 'onnx', 'packaging', 'pydantic', 'nvdlfw-inspect',
                       'nvidia-cudnn-frontend>=1.29.0', 'wheel']
    if 'vllm' in groups:
        vllm, seen = newest_vllm_for_torch(files_dir)
        roots['vllm'] = [vllm]
        notes['vllm'] = dict(candidates=seen, chosen=os.path.basename(vllm))
    files: Dict[str, Dict] = {}
    if len(roots) > 1:  # can the groups share one environment? (TE 2.20.2 and vLLM 0.26.0 cannot)
        try:
            resolve(roots, files_dir, download=False)
            notes['together'] = 'the groups resolve together'
        except RuntimeError as e:
            notes['together'] = 'the groups cannot be installed together: ' + ' '.join(
                ln for ln in str(e).splitlines() if ln.startswith('ERROR: Cannot install'))[:1000]
        log(notes['together'])
    if roots:
        wanted, conflicts = {}, []
        for group, group_roots in roots.items():  # each group resolved alone: installed alone on the GPU
            w, c = resolve({group: group_roots}, files_dir)
            wanted.update(w)
            conflicts += [dict(x, group=group) for x in c]
        notes['conflicts'] = conflicts
        for c in conflicts:
            log(f"conflict (not carried; assemble re-checks on the machine): {c['package']} requires "
                f"{c['requires']}; the machine has {c['machine_has']}")
        for group, paths in wanted.items():
            for p in paths + sdists.get(group, []):
                entry = files.setdefault(p, dict(path=p, groups=[], kind='sdist' if p.endswith('.tar.gz') else
                                                 'wheel'))
                entry['groups'].append(group)
    for p in args.local:
        files[p] = dict(path=p, groups=['local'], kind='sdist' if p.endswith('.tar.gz') else 'wheel')
    pack(big, list(files.values()), args.part_mib, args.bundle_mib, notes)
    with open(os.path.join(big, 'manifest.json')) as f:
        for e in json.load(f)['files']:
            log(f"{e['size'] / MiB:8.2f} MiB  {','.join(e['groups']):8s} {e['name']}  ({len(e['parts'])} parts)")


# ---------------------------------------------------------------------------------------------- assemble (GPU)
def stash(manifest: Dict, big: str, tmp: str) -> List[str]:
    """Copy the parts under ``big``/carry (what this command carried) into ``tmp``/parts, each checked against the
    manifest; returns the names copied."""
    want = {p['name']: p for e in manifest['files'] for p in e['parts']}
    dest = os.path.join(tmp, 'parts')
    os.makedirs(dest, exist_ok=True)
    got = []
    for root, _, names in os.walk(os.path.join(big, 'carry')):
        for n in sorted(names):
            if n not in want:
                raise ValueError(f'{n}: not in the manifest (a bundle from another prepare-big?)')
            if sha256(os.path.join(root, n)) != want[n]['sha256']:
                raise ValueError(f'{n}: sha256 differs from the manifest (damaged in transfer)')
            shutil.copy(os.path.join(root, n), os.path.join(dest, n))
            got.append(n)
    return got


REQUIREMENT_CHECK = r"""
import sys, zipfile
from importlib import metadata
from packaging.requirements import Requirement
bad = []
for whl in sys.argv[1:]:
    with zipfile.ZipFile(whl) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    for line in text.splitlines():
        if not line.startswith('Requires-Dist:'):
            continue
        req = Requirement(line.split(':', 1)[1].strip())
        if req.marker and not req.marker.evaluate({'extra': ''}):
            continue
        try:
            v = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f'{whl.rsplit("/", 1)[-1]}: {req} (missing)')
            continue
        if not req.specifier.contains(v, prereleases=True):
            bad.append(f'{whl.rsplit("/", 1)[-1]}: {req} (installed {v})')
print('\n'.join(bad))
"""


def unmet_requirements(wheels: List[str], env: Dict[str, str]) -> List[str]:
    """The requirements of ``wheels`` that the environment (``env``'s PYTHONPATH over the interpreter's packages)
    does not meet: on the GPU machine, where the image's versions are real."""
    r = subprocess.run([sys.executable, '-c', REQUIREMENT_CHECK, *wheels], capture_output=True, text=True, env=env)
    return [ln for ln in r.stdout.splitlines() if ln.strip()] or ([f'check failed: {r.stderr[-500:]}'] if r.returncode
                                                                   else [])


def build_sdist(sdist: str, wheel_dir: str, env: Dict[str, str]) -> (str, float):
    """``pip wheel`` of an sdist against the installed packages (the image's torch): no index, no isolation, every
    core compiling (``MAX_JOBS``)."""
    env = dict(env, MAX_JOBS=env.get('MAX_JOBS', str(os.cpu_count() or 1)))
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-v', '--no-index', '--no-deps', '--no-build-isolation',
                        '-w', wheel_dir, sdist], capture_output=True, text=True, env=env)
    seconds = time.time() - t0
    if r.returncode:
        raise RuntimeError(f'building {os.path.basename(sdist)} failed after {seconds:.0f} s:\n'
                           f'{(r.stdout + r.stderr)[-4000:]}')
    base = os.path.basename(sdist)[:-len('.tar.gz')].split('-')[0]
    wheel = next(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir)
                 if f.endswith('.whl') and f.split('-')[0] == base)
    return wheel, seconds


def assemble(args):
    big = os.path.join(args.kit, 'big')
    with open(os.path.join(big, 'manifest.json')) as f:
        manifest = json.load(f)
    got = stash(manifest, big, args.tmp)
    parts_dir, files_dir = os.path.join(args.tmp, 'parts'), os.path.join(args.tmp, 'files')
    log(f'copied {len(got)} parts into {parts_dir}')
    report = dict(stashed=got, groups={})
    status = 0
    for group in sorted({g for e in manifest['files'] for g in e['groups']}):
        entries = [e for e in manifest['files'] if group in e['groups']]
        missing = sorted({p['bundle'] for e in entries for p in e['parts']
                          if not os.path.exists(os.path.join(parts_dir, p['name']))})
        g = report['groups'][group] = dict(missing_bundles=missing)
        if missing:
            log(f'{group}: bundles still to carry: {" ".join(missing)}')
            continue
        if args.groups and group not in args.groups.split(','):
            continue
        paths = [join_parts(e, parts_dir, files_dir) for e in entries]
        log(f'{group}: {len(paths)} files joined in {files_dir}, sha256 as in the manifest')
        wheels = [p for p, e in zip(paths, entries) if e['kind'] == 'wheel']
        if args.no_install:
            continue
        r = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                            '--upgrade', '--target', args.site, *wheels], capture_output=True, text=True)
        if r.returncode:
            log(f'{group}: pip install failed: {r.stderr[-3000:]}')
            status = 1
            continue
        log(f'{group}: {len(wheels)} wheels installed into {args.site}')
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.site] + [p for p in [os.environ.get('PYTHONPATH')]
                                                                           if p]))
        g['unmet_requirements'] = unmet_requirements(wheels, env)
        for line in g['unmet_requirements']:
            log(f'{group}: unmet on this machine: {line}')
        for sdist in [p for p, e in zip(paths, entries) if e['kind'] == 'sdist']:
            try:
                wheel, seconds = build_sdist(sdist, os.path.join(args.tmp, 'built'), env)
            except RuntimeError as e:
                log(str(e))
                g.setdefault('build_failed', []).append(os.path.basename(sdist))
                status = 1
                continue
            log(f'{group}: built {os.path.basename(wheel)} ({os.path.getsize(wheel) / MiB:.1f} MiB) in {seconds:.0f} s')
            subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                            '--upgrade', '--target', args.site, wheel], check=True)
            out = os.path.join(args.out, 'built')
            parts = split_file(wheel, int(args.built_part_mib * MiB), out)
            g.setdefault('built', []).append(dict(name=os.path.basename(wheel), size=os.path.getsize(wheel),
                                                  sha256=sha256(wheel), build_s=round(seconds, 1), parts=parts))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'assemble.json'), 'w') as f:
            json.dump(report, f, indent=1)
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=['prepare', 'assemble', 'pack'])
    p.add_argument('--kit', default=os.environ.get('GPUKIT') or os.path.join(HERE, '..', '..', '.gpukit'))
    p.add_argument('--groups', default=None, help='prepare: te,vllm (default both); assemble: only these groups')
    p.add_argument('--local', nargs='*', default=[], help='prepare/pack: local files to carry too (group "local")')
    p.add_argument('--part-mib', type=float, default=56.0, help='largest part (default 56 MiB)')
    p.add_argument('--bundle-mib', type=float, default=56.0,
                   help='largest bundle: what one GPU command carries (default 56 MiB; the limit is 64 MiB with '
                        'the checkout)')
    p.add_argument('--tmp', default=os.environ.get('GPUKIT_BIG_TMP', '/tmp/gpukit-big'))
    p.add_argument('--site', default=os.environ.get('GPUKIT_SITE', '/tmp/gpukit-site'))
    p.add_argument('--out', default=os.environ.get('GPUKIT_OUT') or os.environ.get('OUT') or '')
    p.add_argument('--built-part-mib', type=float, default=16.0, help='assemble: parts of a built wheel under --out')
    p.add_argument('--no-install', action='store_true', help='assemble: join and verify only')
    args = p.parse_args(argv)
    if args.command == 'assemble':
        return assemble(args)
    if args.command == 'pack':
        args.groups = ''
    elif args.groups is None:
        args.groups = 'te,vllm'
    prepare(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
