// Helpers shared by the deploy tests: command-line flags, running programs, and readers for the
// two formats those tests check that no npm package reads the way we need: scripts/*.txt package
// lists (as scripts/install_packages reads them) and deploy/docker/Dockerfile.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// The repository root (this file is tests/deploy/lib.mjs).
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

// parseFlags(['--a', 'x', '--b', 'y', '--b', 'z']) -> { a: ['x'], b: ['y', 'z'] }
export function parseFlags(argv) {
  const flags = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z0-9-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m) throw new Error(`unexpected argument "${argv[i]}"`);
    const value = m[2] !== undefined ? m[2] : argv[++i];
    if (value === undefined) throw new Error(`--${m[1]} needs a value`);
    (flags[m[1]] ??= []).push(value);
  }
  return flags;
}

// Runs a program to completion: { status, stdout, stderr, error } (error set when it could not
// start, e.g. ENOENT).
export function run(cmd, args, options = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...options });
  return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', error: r.error };
}

// A package list as scripts/install_packages reads it (`read -r pkg cond cmd _` per line; blank
// lines and lines starting with # skipped): [{ pkg, cond, cmd, line }].
export function readPackageList(file) {
  const out = [];
  fs.readFileSync(file, 'utf8').split('\n').forEach((text, i) => {
    const [pkg, cond, cmd] = text.trim().split(/\s+/);
    if (!pkg || pkg.startsWith('#')) return;
    out.push({ pkg, cond, cmd, line: i + 1 });
  });
  return out;
}

// Splits a shell-ish word list on whitespace (the Dockerfile instructions here use no quoting in
// their flags; JSON arrays are handled by the callers).
function words(s) {
  return s.trim().split(/\s+/).filter(Boolean);
}

// Leading --flag[=value] words of an instruction, and the rest.
function splitFlags(ws) {
  const flags = [];
  let i = 0;
  for (; i < ws.length && ws[i].startsWith('--'); i++) {
    const eq = ws[i].indexOf('=');
    flags.push(eq < 0 ? { name: ws[i].slice(2), value: '' }
                      : { name: ws[i].slice(2, eq), value: ws[i].slice(eq + 1) });
  }
  return { flags, rest: ws.slice(i) };
}

// "type=bind,source=a,target=/b" -> { type: 'bind', source: 'a', target: '/b' }
function parseMount(spec) {
  const m = {};
  for (const kv of spec.split(',')) {
    const eq = kv.indexOf('=');
    m[eq < 0 ? kv : kv.slice(0, eq)] = eq < 0 ? true : kv.slice(eq + 1);
  }
  if (m.src && !m.source) m.source = m.src;
  if (m.dst && !m.target) m.target = m.dst;
  if (m.destination && !m.target) m.target = m.destination;
  return m;
}

// Parses a Dockerfile into stages: [{ image, name, instructions: [{ op, args, line, ... }] }].
// Continuation lines are joined and comment lines dropped, as Docker does. RUN gets `mounts`
// and `command`; COPY/ADD get `from`, `sources` and `dest`; CMD/ENTRYPOINT get `json` (the exec
// form's array, or null for the shell form).
export function parseDockerfile(text) {
  const logical = [];
  let current = null;
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (/^\s*#/.test(line)) return;  // comments (and parser directives)
    if (current === null) {
      if (!line.trim()) return;
      current = { text: '', line: i + 1 };
    }
    const continued = /\\\s*$/.test(line);
    current.text += (continued ? line.replace(/\\\s*$/, '') : line) + ' ';
    if (!continued) {
      logical.push(current);
      current = null;
    }
  });
  if (current) logical.push(current);

  const stages = [];
  for (const { text: t, line } of logical) {
    const m = /^\s*(\S+)\s*(.*)$/.exec(t);
    const op = m[1].toUpperCase();
    const argText = m[2].trim();
    const ins = { op, args: argText, line };
    if (op === 'FROM') {
      const { rest } = splitFlags(words(argText));
      const as = rest.findIndex((w) => w.toUpperCase() === 'AS');
      stages.push({ image: rest[0], name: as >= 0 ? rest[as + 1] : null, line, instructions: [] });
      continue;
    }
    if (op === 'RUN') {
      const { flags, rest } = splitFlags(words(argText));
      ins.mounts = flags.filter((f) => f.name === 'mount').map((f) => parseMount(f.value));
      ins.command = rest.join(' ');
    } else if (op === 'COPY' || op === 'ADD') {
      const ws = words(argText);
      const { flags, rest } = splitFlags(ws);
      const from = flags.find((f) => f.name === 'from');
      ins.from = from ? from.value : null;
      const list = rest.length && rest[0].startsWith('[') ? JSON.parse(rest.join(' ')) : rest;
      ins.sources = list.slice(0, -1);
      ins.dest = list[list.length - 1];
    } else if (op === 'CMD' || op === 'ENTRYPOINT') {
      try {
        ins.json = argText.startsWith('[') ? JSON.parse(argText) : null;
      } catch {
        ins.json = null;
      }
    }
    if (!stages.length) throw new Error(`Dockerfile line ${line}: ${op} before FROM`);
    stages[stages.length - 1].instructions.push(ins);
  }
  return stages;
}

export function readDockerfile() {
  return parseDockerfile(fs.readFileSync(path.join(REPO, 'deploy/docker/Dockerfile'), 'utf8'));
}

// The runtime image's user from the last stage's USER instruction: { uid, gid } (numbers, or
// null when not numeric).
export function imageUser(stages) {
  const user = stages[stages.length - 1].instructions.filter((i) => i.op === 'USER').pop();
  if (!user) return null;
  const [u, g] = user.args.split(':');
  const num = (s) => (s !== undefined && /^\d+$/.test(s) ? Number(s) : null);
  return { uid: num(u), gid: num(g), text: user.args };
}
