// duet_deploy_docker_test: deploy/docker/Dockerfile cannot drift from the package lists and the
// binaries. No Docker engine runs here, so this reads the Dockerfile and asks dpkg and ldd:
//   - the builder stage installs scripts/packages.txt (what scripts/setup installs) with
//     scripts/install_packages, and nothing by hand;
//   - the runtime stage installs scripts/packages-runtime.txt the same way, and nothing else;
//   - every shared library `ldd` reports for the built binaries belongs (dpkg -S) to a package of
//     packages-runtime.txt or of the base image, and every runtime package provides one of them;
//   - every COPY and bind-mount source exists and is not excluded by .dockerignore; the binaries
//     copied from the builder are the CMake targets' outputs;
//   - the image runs as a numeric non-root user, with an exec-form CMD.
//
//   node tests/deploy/docker_test.mjs --build-dir DIR --bin PATH [--bin PATH]...
import test from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { REPO, parseFlags, run, readPackageList, readDockerfile, imageUser } from './lib.mjs';

const flags = parseFlags(process.argv.slice(2));
const buildDir = flags['build-dir']?.[0];
const bins = flags.bin ?? [];
if (!buildDir || bins.length === 0) {
  process.stderr.write('docker_test: --build-dir DIR and --bin PATH (one per binary) are required\n');
  process.exit(1);
}

const stages = readDockerfile();
const builder = stages[0];
const runtime = stages[stages.length - 1];

// Libraries that debian:bookworm-slim already has, so packages-runtime.txt need not list them.
// Each is there because a package every Debian image carries depends on it; the test checks that
// dependency with dpkg on this (bookworm) machine.
const BASE_IMAGE = [
  { pkg: 'libc6', via: 'dpkg', why: 'glibc: dpkg (Essential) pre-depends on it' },
  { pkg: 'zlib1g', via: 'dpkg', why: 'zlib: dpkg (Essential) pre-depends on it' },
  { pkg: 'libgcc-s1', via: 'libc6', why: 'libgcc_s: libc6 depends on it' },
  { pkg: 'libstdc++6', via: 'apt', why: 'the C++ runtime: apt (in every Debian image) depends on it' },
];

const packagesOf = (list) => readPackageList(path.join(REPO, list)).map((p) => p.pkg);

// The RUN steps of a stage that call install_packages, and those that install by hand.
function installSteps(stage) {
  const runs = stage.instructions.filter((i) => i.op === 'RUN');
  return {
    viaScript: runs.filter((r) => /install_packages/.test(r.command)),
    byHand: runs.filter((r) => /\b(apt-get|apt|aptitude|dpkg)\s+(-\S+\s+)*(install|-i)\b/.test(r.command)),
  };
}

// The list file a RUN step passes to install_packages, as a repository path (through its bind
// mount): e.g. scripts/packages.txt.
function installedList(step) {
  const args = /install_packages\s+([^&;|]*)/.exec(step.command)?.[1].trim().split(/\s+/) ?? [];
  assert.equal(args.length, 1, `line ${step.line}: install_packages takes exactly one list here`);
  const script = step.mounts.find((mt) => step.command.includes(mt.target) && mt.source === 'scripts/install_packages');
  assert.ok(script, `line ${step.line}: install_packages must be bind-mounted from scripts/install_packages`);
  const list = step.mounts.find((mt) => mt.target === args[0]);
  assert.ok(list, `line ${step.line}: ${args[0]} is not bind-mounted from the repository`);
  return list.source;
}

// Every library of the binaries: [{ lib, file, pkg, bins }], pkg from dpkg -S (trying the
// merged-/usr twins, /lib <-> /usr/lib, and the real file behind the symlink). Computed once.
let librariesCache;
function sharedLibraries() {
  if (librariesCache) return librariesCache;
  const libs = new Map();
  for (const bin of bins) {
    const r = run('ldd', [bin]);
    assert.equal(r.status, 0, `ldd ${bin} failed: ${r.stderr}`);
    for (const line of r.stdout.split('\n')) {
      const m = /^\s*(\S+)\s+=>\s+(.*?)\s+\(0x[0-9a-f]+\)\s*$/.exec(line);
      if (!m) continue;  // linux-vdso, the dynamic loader itself (libc6)
      assert.notEqual(m[2], 'not found', `${bin}: ${m[1]} not found`);
      const entry = libs.get(m[2]) ?? { lib: m[1], file: m[2], pkg: null, bins: [] };
      entry.bins.push(path.basename(bin));
      libs.set(m[2], entry);
    }
  }
  const candidates = (file) => {
    const out = new Set();
    for (const p of [file, fs.realpathSync(file)]) {
      out.add(p);
      if (p.startsWith('/usr/lib/')) out.add(p.slice(4));
      else if (p.startsWith('/lib')) out.add(`/usr${p}`);
    }
    return [...out];
  };
  // One dpkg -S for all paths (it exits 1 when some are unknown, and still prints the rest).
  const all = [...libs.keys()].flatMap(candidates);
  const owner = new Map();
  for (const line of run('dpkg', ['-S', ...all]).stdout.split('\n')) {
    const m = /^([^:,]+)(?::[^:]+)?: (\/.*)$/.exec(line);
    if (m) owner.set(m[2], m[1]);
  }
  for (const entry of libs.values()) {
    entry.pkg = candidates(entry.file).map((c) => owner.get(c)).find(Boolean) ?? null;
  }
  librariesCache = [...libs.values()];
  return librariesCache;
}

test('the builder stage is debian:bookworm, the runtime stage debian:bookworm-slim', () => {
  assert.equal(stages.length, 2, 'two stages');
  assert.equal(builder.image, 'debian:bookworm');
  assert.equal(runtime.image, 'debian:bookworm-slim');
  assert.ok(builder.name, 'the builder stage is named (COPY --from uses it)');
});

test('the builder installs scripts/packages.txt with scripts/install_packages, nothing by hand', () => {
  const { viaScript, byHand } = installSteps(builder);
  assert.deepEqual(byHand.map((r) => r.line), [], 'apt-get/dpkg install outside install_packages');
  assert.deepEqual(viaScript.map(installedList), ['scripts/packages.txt']);
  // The same list scripts/setup installs: one source of truth for what duet builds with.
  assert.match(fs.readFileSync(path.join(REPO, 'scripts/setup'), 'utf8'),
    /scripts\/install_packages scripts\/packages\.txt/, 'scripts/setup installs another list');
  assert.ok(packagesOf('scripts/packages.txt').length > 0);
});

test('the runtime stage installs scripts/packages-runtime.txt and nothing else', () => {
  const { viaScript, byHand } = installSteps(runtime);
  assert.deepEqual(byHand.map((r) => r.line), [], 'apt-get/dpkg install outside install_packages');
  assert.deepEqual(viaScript.map(installedList), ['scripts/packages-runtime.txt']);
  for (const p of readPackageList(path.join(REPO, 'scripts/packages-runtime.txt'))) {
    // if-missing would depend on what the image happens to contain.
    assert.equal(p.cond, undefined, `packages-runtime.txt line ${p.line}: one package name per line`);
  }
  // No build tool or -dev package in the runtime image.
  for (const pkg of packagesOf('scripts/packages-runtime.txt')) {
    assert.doesNotMatch(pkg, /-dev$|^(cmake|build-essential|gcc|g\+\+)$/, `${pkg} is a build dependency`);
  }
});

test('the base image packages are really in every Debian image', () => {
  for (const { pkg, via, why } of BASE_IMAGE) {
    const r = run('dpkg-query', ['-W', '-f=${Essential}\\n${Pre-Depends}\\n${Depends}', via]);
    assert.equal(r.status, 0, `dpkg-query ${via}: ${r.stderr}`);
    const [essential, pre, deps] = r.stdout.split('\n');
    const names = `${pre},${deps}`.split(/[,|]/).map((d) => d.trim().split(/[\s:(]/)[0]);
    assert.ok(names.includes(pkg), `${pkg} (${why}): ${via} does not depend on it here`);
    assert.ok(essential === 'yes' || ['apt', 'libc6'].includes(via), `${via} is neither Essential nor apt/libc6`);
  }
});

test('every shared library of the binaries comes from packages-runtime.txt or the base image', () => {
  const runtimePkgs = new Set(packagesOf('scripts/packages-runtime.txt'));
  const basePkgs = new Set(BASE_IMAGE.map((b) => b.pkg));
  const libs = sharedLibraries();
  assert.ok(libs.length > 0, 'ldd found no libraries');
  const missing = libs.filter((l) => !runtimePkgs.has(l.pkg) && !basePkgs.has(l.pkg))
    .map((l) => `${l.lib} (${l.file}, package ${l.pkg ?? 'unknown to dpkg'}, needed by ${l.bins.join(', ')})`);
  assert.deepEqual(missing, [], 'add these packages to scripts/packages-runtime.txt');
});

test('every package of packages-runtime.txt provides a library the binaries load', () => {
  const used = new Set(sharedLibraries().map((l) => l.pkg));
  const unused = packagesOf('scripts/packages-runtime.txt').filter((p) => !used.has(p));
  assert.deepEqual(unused, [], 'no binary loads anything from these: drop them from scripts/packages-runtime.txt');
});

// .dockerignore patterns as Docker reads them (Go filepath.Match, `**` for any directories, a
// path also excluded when one of its parents is), without `!` exceptions (none are used).
function dockerignored(rel) {
  const patterns = fs.readFileSync(path.join(REPO, '.dockerignore'), 'utf8').split('\n')
    .map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  assert.ok(patterns.every((p) => !p.startsWith('!')), '.dockerignore exceptions are not handled here');
  const regexes = patterns.map((p) => new RegExp(`^${path.posix.normalize(p).replace(/\/$/, '')
    .replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*\*\//g, '\u0000').replace(/\*/g, '[^/]*')
    .replace(/\?/g, '[^/]').replace(/\u0000/g, '(.*/)?')}$`));
  const parts = path.posix.normalize(rel).split('/');
  return parts.some((_, i) => regexes.some((re) => re.test(parts.slice(0, i + 1).join('/'))));
}

test('.dockerignore keeps build directories, node_modules and tests out of the context', () => {
  for (const p of ['build', 'build-dec', 'tests/node/node_modules', 'tests', '.git']) {
    assert.ok(dockerignored(p), `${p} is sent to the Docker daemon`);
  }
  for (const p of ['CMakeLists.txt', 'common/tensor', 'scripts/packages.txt', 'models/duet-tiny']) {
    assert.ok(!dockerignored(p), `${p} is excluded, but the build needs it`);
  }
});

test('every COPY and bind-mount source exists in the repository and is in the build context', () => {
  const sources = [];
  for (const stage of stages) {
    for (const i of stage.instructions) {
      if (i.op === 'ADD') assert.fail(`line ${i.line}: ADD (COPY says what it does)`);
      if (i.op === 'COPY' && !i.from) sources.push(...i.sources.map((s) => ({ s, line: i.line })));
      for (const m of i.mounts ?? []) {
        if (m.type === 'bind' && !m.from) sources.push({ s: m.source, line: i.line });
      }
    }
  }
  assert.ok(sources.length > 0);
  for (const { s, line } of sources) {
    if (s === '.') continue;
    assert.ok(fs.existsSync(path.join(REPO, s)), `line ${line}: ${s} does not exist`);
    assert.ok(!dockerignored(s), `line ${line}: ${s} is excluded by .dockerignore`);
  }
});

test('the binaries copied from the builder are the CMake targets this test was given', () => {
  const fromBuild = runtime.instructions.filter((i) => i.op === 'COPY' && i.from === builder.name);
  const copied = fromBuild.flatMap((i) => i.sources);
  const want = bins.map((b) => `/build/${path.relative(buildDir, b)}`);
  assert.deepEqual([...copied].sort(), [...want].sort(), 'COPY --from=build sources vs the built targets');
  for (const i of fromBuild) assert.equal(i.dest, '/usr/local/bin/');
  const build = builder.instructions.filter((i) => i.op === 'RUN' && /cmake --build/.test(i.command));
  assert.equal(build.length, 1, 'one cmake --build step');
  assert.match(build[0].command, /-B \/build\b/, 'the builder builds in /build');
  for (const b of bins) {
    assert.match(build[0].command, new RegExp(`--target [^&]*\\b${path.basename(b)}\\b`), `${path.basename(b)} is not a --target`);
  }
});

test('the image runs as a numeric non-root user with an exec-form CMD and no entrypoint', () => {
  const user = imageUser(stages);
  assert.ok(user && user.uid > 0 && user.gid > 0, `USER must be uid:gid, non-root (got ${user?.text})`);
  const setup = runtime.instructions.find((i) => i.op === 'RUN' && /useradd/.test(i.command));
  assert.match(setup?.command ?? '', new RegExp(`--uid ${user.uid}\\b`), 'the user is created with that uid');
  assert.ok(!runtime.instructions.some((i) => i.op === 'ENTRYPOINT'), 'no ENTRYPOINT');
  const cmd = runtime.instructions.filter((i) => i.op === 'CMD');
  assert.equal(cmd.length, 1);
  assert.ok(Array.isArray(cmd[0].json), 'CMD in exec (JSON) form: no shell in between');
  const exposed = runtime.instructions.filter((i) => i.op === 'EXPOSE').flatMap((i) => i.args.split(/\s+/));
  assert.ok(exposed.length > 0, 'EXPOSE the ports');
});

test('the bundled model is in the image', () => {
  const copy = runtime.instructions.find((i) => i.op === 'COPY' && !i.from && i.sources.includes('models/duet-tiny'));
  assert.ok(copy, 'COPY models/duet-tiny');
  assert.equal(copy.dest, '/usr/share/duet/models/duet-tiny');
  for (const f of ['config.json', 'model.safetensors', 'tokenizer.json']) {
    assert.ok(fs.existsSync(path.join(REPO, 'models/duet-tiny', f)), `models/duet-tiny/${f}`);
  }
});
