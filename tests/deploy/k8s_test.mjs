// duet_deploy_k8s_test: renders every overlay of deploy/k8s with `kubectl kustomize` and checks
// what a cluster would otherwise find out at apply time, or never:
//   - every object against the Kubernetes 1.27 API schema (npm kubernetes-models; the
//     ServiceMonitor with @kubernetes-models/prometheus-operator), unknown fields included, and
//     that this validation does reject broken objects;
//   - selectors (Services, PDBs, HPAs, the ServiceMonitor) against the Deployments' pod labels;
//   - ports, probes and DUET_PREFILL against DUET_LISTEN / DUET_METRICS_LISTEN;
//   - every DUET_* variable against the built binaries' --help;
//   - the shutdown budget, security context, resources, replicas per overlay;
//   - the Grafana dashboard ConfigMap against deploy/grafana/duet.json;
//   - the kustomizations against what kubectl 1.20's kustomize (v2.0.3) understands.
//
//   node tests/deploy/k8s_test.mjs --prefill-bin PATH --decode-bin PATH [--kubectl PATH]...
//
// With several --kubectl (say the machine's and Debian's 1.20), each renders every overlay and
// all must agree. Needs scripts/fetch_deploy_deps (npm) and kubectl (Debian: kubernetes-client).
import test from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { REPO, parseFlags, run, readDockerfile, imageUser } from './lib.mjs';

function die(message) {
  process.stderr.write(`k8s_test: ${message}\n`);
  process.exit(1);
}

const flags = parseFlags(process.argv.slice(2));
const K8S = path.join(REPO, 'deploy/k8s');

// ---- prerequisites: npm packages, kubectl, the binaries -------------------------------------

const require = createRequire(path.join(REPO, 'tests/deploy/package.json'));
let YAML;
try {
  YAML = require('yaml');
  require.resolve('kubernetes-models/apps/v1');
  require.resolve('@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1');
} catch (e) {
  die(`tests/deploy/node_modules is missing or incomplete (${e.code ?? e.message}): run scripts/fetch_deploy_deps`);
}

const kubectls = flags.kubectl ?? ['kubectl'];
for (const k of kubectls) {
  const v = run(k, ['version', '--client']);
  if (v.error) {
    die(`cannot run ${k} (${v.error.code}): install kubectl, e.g. Debian's kubernetes-client ` +
        `(scripts/install_packages scripts/packages-test.txt)`);
  }
}

// Role -> the server binary and its --help text.
const BINARIES = {};
for (const [role, flag] of [['prefill', 'prefill-bin'], ['decode', 'decode-bin']]) {
  const bin = flags[flag]?.[0];
  if (!bin) die(`--${flag} PATH is required (ctest passes the built duet-${role})`);
  const h = run(bin, ['--help']);
  if (h.error || h.status !== 0) {
    die(`${bin} --help failed (${h.error?.code ?? `exit ${h.status}`}): ${h.stderr.trim()}`);
  }
  BINARIES[role] = { bin, name: path.basename(bin), help: h.stdout + h.stderr };
}
const ROLE_OF_BINARY = Object.fromEntries(Object.entries(BINARIES).map(([r, b]) => [b.name, r]));

// ---- rendering ---------------------------------------------------------------------------------

const OVERLAYS = fs.readdirSync(path.join(K8S, 'overlays')).sort();

function render(kubectl, dir) {
  const r = run(kubectl, ['kustomize', dir]);
  if (r.error || r.status !== 0) {
    throw new Error(`${kubectl} kustomize ${path.relative(REPO, dir)} failed:\n${r.stderr}`);
  }
  return YAML.parseAllDocuments(r.stdout).map((d) => d.toJS()).filter((o) => o);
}

const key = (o) => `${o.kind}/${o.metadata?.name}`;
// Objects sorted by kind/name, containers' env sorted by name: kustomize versions order merged
// env lists differently, which means nothing while no value refers to another ($(VAR), checked).
function canonical(objs) {
  const copy = structuredClone(objs).sort((a, b) => key(a).localeCompare(key(b)));
  for (const o of copy) {
    for (const c of o.spec?.template?.spec?.containers ?? []) {
      c.env?.sort((a, b) => a.name.localeCompare(b.name));
    }
  }
  return JSON.stringify(copy);
}

// Renders every overlay with the first kubectl; the others are compared in their own test.
const RENDERED = {};
for (const overlay of OVERLAYS) {
  try {
    RENDERED[overlay] = render(kubectls[0], path.join(K8S, 'overlays', overlay));
  } catch (e) {
    RENDERED[overlay] = e;
  }
}

// ---- schema validation -------------------------------------------------------------------------

// The kubernetes-models class for an apiVersion/kind (undefined when there is none).
function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  const pkg = group === 'monitoring.coreos.com' ? '@kubernetes-models/prometheus-operator'
                                                : 'kubernetes-models';
  try {
    return require(`${pkg}/${group ? `${group}/` : ''}${version}`)[kind];
  } catch {
    return undefined;
  }
}

// Schema errors of an object ([] when valid), each with ajv's instancePath and message.
function schemaErrors(obj, Model = modelFor(obj.apiVersion, obj.kind)) {
  if (!Model) return [{ instancePath: '', message: `no schema for ${obj.apiVersion} ${obj.kind}` }];
  try {
    new Model(obj).validate();
    return [];
  } catch (e) {
    if (!e.errors) throw e;
    return e.errors;
  }
}

const pointer = (keys) => keys.map((k) => `/${String(k).replace(/~/g, '~0').replace(/\//g, '~1')}`).join('');

// The API schemas accept fields they do not define (the API server drops or, with strict field
// validation, rejects them), so a misspelt optional field (readOnlyRootFileSystem) would pass.
// A field is known when replacing its value with something no schema type accepts makes the
// validator complain at that path; fields that pass that test are reported as unknown.
function unknownFields(obj) {
  const Model = modelFor(obj.apiVersion, obj.kind);
  const unknown = [];
  const walk = (node, keys) => {
    if (Array.isArray(node)) {
      node.forEach((v, i) => walk(v, [...keys, i]));
      return;
    }
    if (node === null || typeof node !== 'object') return;
    for (const k of Object.keys(node)) {
      const at = [...keys, k];
      const copy = structuredClone(obj);
      at.slice(0, -1).reduce((n, step) => n[step], copy)[k] = [[null]];
      const p = pointer(at);
      if (!schemaErrors(copy, Model).some((e) => e.instancePath === p || e.instancePath.startsWith(`${p}/`))) {
        unknown.push(p);
        continue;
      }
      walk(node[k], at);
    }
  };
  walk(obj, []);
  return unknown;
}

// ---- reading the rendered objects -------------------------------------------------------------

function selectorMatches(selector, labels) {
  if (!selector || (!selector.matchLabels && !selector.matchExpressions)) return false;
  for (const [k, v] of Object.entries(selector.matchLabels ?? {})) if (labels[k] !== v) return false;
  for (const e of selector.matchExpressions ?? []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    const ok = { In: has && e.values.includes(labels[e.key]),
                 NotIn: !(has && e.values.includes(labels[e.key])),
                 Exists: has, DoesNotExist: !has }[e.operator];
    if (ok === undefined) throw new Error(`unknown selector operator ${e.operator}`);
    if (!ok) return false;
  }
  return true;
}

// Kubernetes quantities: cpu in cores, memory in bytes.
function quantity(q) {
  const m = /^([0-9.]+)([a-zA-Z]*)$/.exec(String(q));
  assert.ok(m, `cannot read quantity "${q}"`);
  const mult = { '': 1, m: 1e-3, k: 1e3, M: 1e6, G: 1e9, T: 1e12, Ki: 2 ** 10, Mi: 2 ** 20,
                 Gi: 2 ** 30, Ti: 2 ** 40 }[m[2]];
  assert.ok(mult !== undefined, `unknown quantity suffix in "${q}"`);
  return Number(m[1]) * mult;
}

const envOf = (c) => Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value]));

function hostPort(value, what) {
  const m = /^(.*):(\d+)$/.exec(value ?? '');
  assert.ok(m, `${what}="${value}" is not HOST:PORT`);
  return { host: m[1], port: Number(m[2]) };
}

// Everything the checks need about one overlay's objects.
function view(objects) {
  const of = (kind) => objects.filter((o) => o.kind === kind);
  const deployments = of('Deployment').map((d) => {
    const spec = d.spec.template.spec;
    assert.equal(spec.containers.length, 1, `${key(d)}: one container expected`);
    const c = spec.containers[0];
    const binary = path.basename(c.command?.[0] ?? '');
    const role = ROLE_OF_BINARY[binary];
    assert.ok(role, `${key(d)}: command ${JSON.stringify(c.command)} runs neither ${Object.keys(ROLE_OF_BINARY).join(' nor ')}`);
    return { d, spec, c, env: envOf(c), role, labels: d.spec.template.metadata.labels ?? {} };
  });
  const byRole = Object.fromEntries(deployments.map((x) => [x.role, x]));
  return { objects, of, deployments, byRole };
}

const namespaceOf = (objects) => {
  const ns = [...new Set(objects.map((o) => o.metadata.namespace))];
  assert.equal(ns.length, 1, `every object in one namespace, got ${ns.join(', ')}`);
  return ns[0];
};

// ---- the Dockerfile's side (what the image provides) -----------------------------------------

const DOCKER = readDockerfile();
const RUNTIME = DOCKER[DOCKER.length - 1].instructions;
const IMAGE_USER = imageUser(DOCKER);
const IMAGE_FILES = RUNTIME.filter((i) => i.op === 'COPY').flatMap((i) =>
  i.dest.endsWith('/') ? i.sources.map((s) => i.dest + path.basename(s)) : [i.dest]);
const IMAGE_PORTS = RUNTIME.filter((i) => i.op === 'EXPOSE')
  .flatMap((i) => i.args.split(/\s+/)).map((p) => Number(p.split('/')[0]));

// What each overlay must be (the rest is checked for every overlay alike).
const EXPECT = {
  dev: { namespace: 'duet-dev', minReplicas: (n) => n === 1, what: 'exactly 1' },
  prod: { namespace: 'duet', minReplicas: (n) => n >= 2, what: 'at least 2' },
};

// After the drain, the servers stop their gRPC server (decode allows 1 s more, prefill cancels
// what is left) and free their memory: the grace period keeps at least this much beyond
// preStop + DUET_DRAIN_S.
const MIN_EXIT_MARGIN_S = 5;
// The startup probe must allow this long for a model to load (about a minute for 1B on CPU).
const MIN_STARTUP_S = 120;
// The servers' gRPC health service names (besides ""), from proto/duet/v1/*.proto.
const HEALTH_SERVICES = { prefill: 'duet.v1.PrefillService', decode: 'duet.v1.DecodeService' };

// ---- the tests ---------------------------------------------------------------------------------

test('the kustomizations use only what kubectl 1.20 (kustomize v2.0.3) understands', () => {
  // Fields of kustomize v2.0.3's Kustomization; replicas, labels, components, patches, helmCharts
  // ... came later and make kubectl 1.20 fail or silently ignore them.
  const V2_FIELDS = new Set(['apiVersion', 'kind', 'namespace', 'namePrefix', 'nameSuffix',
    'commonLabels', 'commonAnnotations', 'resources', 'bases', 'crds', 'patchesStrategicMerge',
    'patchesJson6902', 'images', 'configMapGenerator', 'secretGenerator', 'generatorOptions', 'vars']);
  const files = [];
  const find = (dir) => fs.readdirSync(dir, { withFileTypes: true }).forEach((e) => {
    if (e.isDirectory()) find(path.join(dir, e.name));
    else if (e.name === 'kustomization.yaml') files.push(path.join(dir, e.name));
  });
  find(K8S);
  assert.ok(files.length >= 3, 'a base and two overlays');
  for (const f of files) {
    const k = YAML.parse(fs.readFileSync(f, 'utf8'));
    const rel = path.relative(REPO, f);
    for (const field of Object.keys(k)) {
      assert.ok(V2_FIELDS.has(field), `${rel}: "${field}" is not a kustomize v2.0.3 field`);
    }
    // v2.0.3 takes directories only in bases, files only in resources.
    for (const r of k.resources ?? []) {
      assert.ok(fs.statSync(path.join(path.dirname(f), r)).isFile(), `${rel}: resource ${r} must be a file`);
    }
    for (const b of k.bases ?? []) {
      assert.ok(fs.statSync(path.join(path.dirname(f), b)).isDirectory(), `${rel}: base ${b} must be a directory`);
    }
  }
});

test('the overlays are dev and prod', () => {
  for (const o of Object.keys(EXPECT)) assert.ok(OVERLAYS.includes(o), `deploy/k8s/overlays/${o} is missing`);
});

test('the schema check rejects broken objects (it is not a no-op)', () => {
  const objs = RENDERED.dev;
  assert.ok(Array.isArray(objs), String(objs));
  const get = (kind) => structuredClone(objs.find((o) => o.kind === kind));
  const mutants = {
    'a containerPort given as a string': (o = get('Deployment')) => {
      o.spec.template.spec.containers[0].ports[0].containerPort = '50051';
      return o;
    },
    'a grpc probe on a named port (grpc probes take numbers only)': (o = get('Deployment')) => {
      o.spec.template.spec.containers[0].readinessProbe.grpc.port = 'grpc';
      return o;
    },
    'a container without a name': (o = get('Deployment')) => {
      delete o.spec.template.spec.containers[0].name;
      return o;
    },
    'HPA minReplicas given as a string': (o = get('HorizontalPodAutoscaler')) => {
      o.spec.minReplicas = '1';
      return o;
    },
    'a Service port without its number': (o = get('Service')) => {
      delete o.spec.ports[0].port;
      return o;
    },
    'a ServiceMonitor endpoint port given as a number': (o = get('ServiceMonitor')) => {
      o.spec.endpoints[0].port = 9401;
      return o;
    },
  };
  for (const [what, make] of Object.entries(mutants)) {
    assert.notDeepEqual(schemaErrors(make()), [], `the validator accepted ${what}`);
  }
  const typo = get('Deployment');
  typo.spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem = true;
  assert.deepEqual(unknownFields(typo),
    ['/spec/template/spec/containers/0/securityContext/readOnlyRootFileSystem'],
    'the unknown-field check must catch a misspelt field');
  assert.equal(selectorMatches({ matchLabels: { a: 'x' } }, { a: 'y' }), false);
  assert.equal(selectorMatches({}, { a: 'y' }), false, 'an empty selector counts as no selector');
});

if (kubectls.length > 1) {
  test(`every kubectl renders the same objects (${kubectls.join(', ')})`, () => {
    for (const overlay of OVERLAYS) {
      const want = canonical(RENDERED[overlay]);
      for (const k of kubectls.slice(1)) {
        assert.equal(canonical(render(k, path.join(K8S, 'overlays', overlay))), want,
          `${k} renders overlays/${overlay} differently from ${kubectls[0]}`);
      }
    }
  });
}

for (const overlay of OVERLAYS) {
  test(`overlay ${overlay}`, async (t) => {
    const objects = RENDERED[overlay];
    if (objects instanceof Error) throw objects;
    const v = view(objects);
    const expect = EXPECT[overlay];

    await t.test('every object validates against the Kubernetes API schema, no unknown fields', () => {
      for (const o of objects) {
        // kustomize v2.0.3 leaves {metadata: {namespace}} behind for a `$patch: delete`d resource.
        assert.ok(o.apiVersion && o.kind && o.metadata?.name, `an object without apiVersion, kind or name: ${JSON.stringify(o)}`);
        const errs = schemaErrors(o);
        assert.deepEqual(errs.map((e) => `${e.instancePath} ${e.message}`), [], `${key(o)} is invalid`);
        assert.deepEqual(unknownFields(o), [], `${key(o)} has fields the API does not define`);
      }
    });

    await t.test('one Deployment per role: duet-prefill and duet-decode', () => {
      assert.deepEqual(v.deployments.map((x) => x.role).sort(), ['decode', 'prefill']);
    });

    await t.test('all objects live in the overlay namespace', () => {
      const ns = namespaceOf(objects);
      if (expect) assert.equal(ns, expect.namespace);
    });

    await t.test('selectors match the Deployments\' pod labels', () => {
      const podsOf = (selector) => v.deployments.filter((x) => selectorMatches(selector, x.labels));
      for (const x of v.deployments) {
        assert.deepEqual(podsOf(x.d.spec.selector), [x], `${key(x.d)}: its selector must match its own pods only`);
        for (const tsc of x.spec.topologySpreadConstraints ?? []) {
          assert.deepEqual(podsOf(tsc.labelSelector), [x], `${key(x.d)}: topologySpreadConstraints must select its own pods`);
        }
      }
      for (const s of v.of('Service')) {
        assert.equal(podsOf({ matchLabels: s.spec.selector }).length, 1, `${key(s)} must select the pods of one Deployment`);
      }
      for (const pdb of v.of('PodDisruptionBudget')) {
        assert.equal(podsOf(pdb.spec.selector).length, 1, `${key(pdb)} must select the pods of one Deployment`);
      }
      for (const x of v.deployments) {
        const pdbs = v.of('PodDisruptionBudget').filter((p) => selectorMatches(p.spec.selector, x.labels));
        assert.equal(pdbs.length, 1, `${key(x.d)} needs exactly one PodDisruptionBudget`);
        const hpas = v.of('HorizontalPodAutoscaler').filter((h) => h.spec.scaleTargetRef.kind === 'Deployment' &&
          h.spec.scaleTargetRef.apiVersion === 'apps/v1' && h.spec.scaleTargetRef.name === x.d.metadata.name);
        assert.equal(hpas.length, 1, `${key(x.d)} needs exactly one HorizontalPodAutoscaler`);
      }
      assert.equal(v.of('HorizontalPodAutoscaler').length, v.deployments.length, 'no HPA without its Deployment');
    });

    await t.test('ports, probes and Services agree with DUET_LISTEN and DUET_METRICS_LISTEN', () => {
      for (const x of v.deployments) {
        const where = key(x.d);
        const listen = hostPort(x.env.DUET_LISTEN, `${where} DUET_LISTEN`);
        const metrics = hostPort(x.env.DUET_METRICS_LISTEN, `${where} DUET_METRICS_LISTEN`);
        // The binaries default to 127.0.0.1, which a kubelet probe or a peer pod cannot reach.
        assert.equal(listen.host, '0.0.0.0', `${where}: DUET_LISTEN must bind 0.0.0.0 in a pod`);
        assert.equal(metrics.host, '0.0.0.0', `${where}: DUET_METRICS_LISTEN must bind 0.0.0.0 in a pod`);
        const ports = Object.fromEntries((x.c.ports ?? []).map((p) => [p.name, p.containerPort]));
        assert.deepEqual(ports, { grpc: listen.port, metrics: metrics.port }, `${where}: containerPorts`);
        for (const kind of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
          const probe = x.c[kind];
          assert.ok(probe?.grpc, `${where}: ${kind} must be a grpc probe`);
          assert.equal(probe.grpc.port, listen.port, `${where}: ${kind} port`);
          assert.ok(['', undefined, HEALTH_SERVICES[x.role]].includes(probe.grpc.service),
            `${where}: ${kind} asks for health service "${probe.grpc.service}", which duet-${x.role} does not register`);
        }
        assert.equal(x.c.readinessProbe.grpc.service, HEALTH_SERVICES[x.role],
          `${where}: readiness follows the role's own service`);
        for (const p of Object.values(ports)) {
          assert.ok(IMAGE_PORTS.includes(p), `${where}: port ${p} is not EXPOSEd in deploy/docker/Dockerfile`);
        }
      }
      for (const s of v.of('Service')) {
        const x = v.deployments.find((d) => selectorMatches({ matchLabels: s.spec.selector }, d.labels));
        for (const p of s.spec.ports) {
          const target = typeof p.targetPort === 'string'
            ? x.c.ports.find((cp) => cp.name === p.targetPort)?.containerPort : p.targetPort;
          assert.ok(target !== undefined, `${key(s)} port ${p.name}: targetPort ${p.targetPort} is no containerPort of ${key(x.d)}`);
          assert.equal(p.port, target, `${key(s)} port ${p.name}: Service port and container port differ`);
          assert.ok(['grpc', 'metrics'].includes(p.name), `${key(s)}: port names are grpc or metrics`);
        }
      }
    });

    await t.test('decode reaches prefill through the headless Service (dns:/// round_robin)', () => {
      const ns = namespaceOf(objects);
      const target = v.byRole.decode.env.DUET_PREFILL;
      const m = /^dns:\/\/\/([^:/]+)\.([^.:/]+)\.svc\.cluster\.local:(\d+)$/.exec(target ?? '');
      assert.ok(m, `DUET_PREFILL="${target}" is not dns:///<service>.<namespace>.svc.cluster.local:<port>`);
      assert.equal(m[2], ns, 'DUET_PREFILL names another namespace');
      const svc = v.of('Service').find((s) => s.metadata.name === m[1]);
      assert.ok(svc, `DUET_PREFILL names Service ${m[1]}, which is not in the overlay`);
      assert.equal(svc.spec.clusterIP, 'None', `${key(svc)} must be headless, so DNS returns every prefill pod`);
      assert.ok(selectorMatches({ matchLabels: svc.spec.selector }, v.byRole.prefill.labels), `${key(svc)} must select the prefill pods`);
      // DNS of a headless Service returns pod IPs: the port is the pods' own.
      assert.equal(Number(m[3]), hostPort(v.byRole.prefill.env.DUET_LISTEN, 'DUET_LISTEN').port,
        'DUET_PREFILL port must be prefill\'s DUET_LISTEN port');
    });

    await t.test('every DUET_* variable is one the binary accepts (--help lists it and its flag)', () => {
      for (const x of v.deployments) {
        const { help, name } = BINARIES[x.role];
        assert.ok(x.c.command[0] === `/usr/local/bin/${name}` && IMAGE_FILES.includes(x.c.command[0]),
          `${key(x.d)}: ${x.c.command[0]} is not where deploy/docker/Dockerfile puts ${name}`);
        for (const a of x.c.args ?? []) {
          const flag = /^--[a-z0-9-]+/.exec(a);
          if (flag) assert.match(help, new RegExp(`${flag[0]}(?![\\w-])`), `${name} has no flag ${flag[0]}`);
        }
        const names = Object.keys(x.env);
        assert.ok(names.length > 0);
        assert.deepEqual((x.c.env ?? []).filter((e) => e.valueFrom || /\$\(/.test(e.value)), [],
          `${key(x.d)}: plain values only (no valueFrom, no $(VAR) references)`);
        for (const n of names) {
          assert.match(n, /^DUET_[A-Z0-9_]+$/, `${key(x.d)}: ${n} is not a duet setting`);
          const flag = `--${n.slice(5).toLowerCase().replace(/_/g, '-')}`;
          assert.match(help, new RegExp(`\\b${n}\\b`), `${name} --help does not mention ${n}`);
          assert.match(help, new RegExp(`${flag}(?![\\w-])`), `${name} has no flag ${flag} (the twin of ${n})`);
        }
      }
    });

    await t.test('both roles serve the same model, from a mounted volume or the image', () => {
      const { prefill, decode } = v.byRole;
      assert.equal(prefill.env.DUET_MODEL, decode.env.DUET_MODEL, 'DUET_MODEL differs between roles');
      assert.equal(prefill.env.DUET_MODEL_NAME, decode.env.DUET_MODEL_NAME, 'DUET_MODEL_NAME differs between roles');
      for (const x of v.deployments) {
        const model = x.env.DUET_MODEL;
        assert.ok(model?.startsWith('/'), `${key(x.d)}: DUET_MODEL must be an absolute path`);
        const volumes = Object.fromEntries((x.spec.volumes ?? []).map((vol) => [vol.name, vol]));
        for (const m of x.c.volumeMounts ?? []) {
          assert.ok(volumes[m.name], `${key(x.d)}: volumeMount ${m.mountPath} names no volume "${m.name}"`);
        }
        for (const vol of Object.values(volumes)) {
          const claim = vol.persistentVolumeClaim?.claimName;
          if (claim) {
            assert.ok(v.of('PersistentVolumeClaim').some((p) => p.metadata.name === claim),
              `${key(x.d)}: volume ${vol.name} needs PersistentVolumeClaim ${claim}`);
          }
        }
        const mount = (x.c.volumeMounts ?? []).find((m) => model.startsWith(`${m.mountPath}/`));
        if (mount) {
          assert.equal(mount.readOnly, true, `${key(x.d)}: the model volume must be mounted read-only`);
        } else {
          assert.ok(IMAGE_FILES.includes(model),
            `${key(x.d)}: DUET_MODEL=${model} is neither under a volume mount nor copied into the image`);
        }
      }
    });

    await t.test('terminationGracePeriodSeconds >= preStop sleep + DUET_DRAIN_S + exit margin', () => {
      for (const x of v.deployments) {
        const where = key(x.d);
        const cmd = x.c.lifecycle?.preStop?.exec?.command ?? [];
        assert.ok(cmd.length === 2 && cmd[0] === 'sleep' && /^\d+$/.test(cmd[1]),
          `${where}: preStop must be exec ["sleep", "N"] (coreutils' sleep is in the image), got ${JSON.stringify(cmd)}`);
        const preStop = Number(cmd[1]);
        assert.ok(preStop >= 2, `${where}: a preStop under 2 s does not give endpoint removal time to spread`);
        assert.match(x.env.DUET_DRAIN_S ?? '', /^\d+$/, `${where}: DUET_DRAIN_S must be set explicitly`);
        const drain = Number(x.env.DUET_DRAIN_S);
        const grace = x.spec.terminationGracePeriodSeconds;
        assert.ok(grace >= preStop + drain + MIN_EXIT_MARGIN_S,
          `${where}: terminationGracePeriodSeconds ${grace} < preStop ${preStop} + DUET_DRAIN_S ${drain} + ${MIN_EXIT_MARGIN_S}`);
      }
    });

    await t.test('probes: the startup probe waits for the model to load', () => {
      for (const x of v.deployments) {
        const s = x.c.startupProbe;
        const budget = (s.periodSeconds ?? 10) * (s.failureThreshold ?? 3);
        assert.ok(budget >= MIN_STARTUP_S, `${key(x.d)}: startup probe allows ${budget} s, under ${MIN_STARTUP_S} s`);
      }
    });

    await t.test('containers run as non-root with a read-only root filesystem', () => {
      for (const x of v.deployments) {
        const where = key(x.d);
        const sc = { ...(x.spec.securityContext ?? {}), ...(x.c.securityContext ?? {}) };
        assert.equal(sc.runAsNonRoot, true, `${where}: runAsNonRoot`);
        assert.ok(Number.isInteger(sc.runAsUser) && sc.runAsUser > 0, `${where}: runAsUser must be a non-zero uid`);
        assert.equal(sc.runAsUser, IMAGE_USER?.uid, `${where}: runAsUser must be the image's USER (${IMAGE_USER?.text})`);
        assert.equal(sc.runAsGroup, IMAGE_USER?.gid, `${where}: runAsGroup must be the image's group`);
        assert.equal(sc.readOnlyRootFilesystem, true, `${where}: readOnlyRootFilesystem`);
        assert.equal(sc.allowPrivilegeEscalation, false, `${where}: allowPrivilegeEscalation`);
        assert.notEqual(sc.privileged, true, `${where}: privileged`);
        assert.deepEqual(x.c.securityContext?.capabilities?.drop, ['ALL'], `${where}: drop ALL capabilities`);
        assert.equal(x.c.securityContext?.capabilities?.add, undefined, `${where}: no added capabilities`);
        assert.equal(x.spec.automountServiceAccountToken, false, `${where}: duet needs no API token`);
        // Service links would put DUET_PREFILL_PORT etc. in the servers' own DUET_* namespace.
        assert.equal(x.spec.enableServiceLinks, false, `${where}: enableServiceLinks`);
        const tmp = (x.c.volumeMounts ?? []).find((m) => m.mountPath === '/tmp');
        assert.ok(tmp && x.spec.volumes.find((vol) => vol.name === tmp.name)?.emptyDir, `${where}: /tmp is an emptyDir`);
      }
    });

    await t.test('resources: engine threads and memory fit the limits', () => {
      for (const x of v.deployments) {
        const where = key(x.d);
        const { requests, limits } = x.c.resources ?? {};
        for (const r of ['cpu', 'memory']) {
          assert.ok(requests?.[r] && limits?.[r], `${where}: ${r} request and limit`);
          assert.ok(quantity(requests[r]) <= quantity(limits[r]), `${where}: ${r} request above limit`);
        }
        // 0 would mean every core of the node, far more threads than the limit lets run.
        assert.match(x.env.DUET_THREADS ?? '', /^[1-9]\d*$/, `${where}: DUET_THREADS must be a positive count`);
        assert.ok(Number(x.env.DUET_THREADS) <= quantity(limits.cpu),
          `${where}: DUET_THREADS ${x.env.DUET_THREADS} above the CPU limit ${limits.cpu}`);
        if (x.role === 'decode') {
          assert.match(x.env.DUET_KV_CACHE_MB ?? '', /^\d+$/, `${where}: DUET_KV_CACHE_MB must be set`);
          assert.ok(Number(x.env.DUET_KV_CACHE_MB) * 2 ** 20 < quantity(limits.memory),
            `${where}: the K/V cache alone fills the memory limit`);
        }
      }
    });

    await t.test(`replicas: the HPAs own the pool sizes (min ${expect?.what ?? 'any'} per role)`, () => {
      for (const x of v.deployments) {
        assert.equal(x.d.spec.replicas, undefined, `${key(x.d)}: spec.replicas would fight the HPA on every apply`);
        const hpa = v.of('HorizontalPodAutoscaler').find((h) => h.spec.scaleTargetRef.name === x.d.metadata.name);
        assert.ok(hpa.spec.minReplicas <= hpa.spec.maxReplicas, `${key(hpa)}: min above max`);
        if (expect) assert.ok(expect.minReplicas(hpa.spec.minReplicas), `${key(hpa)}: minReplicas ${hpa.spec.minReplicas}, want ${expect.what}`);
        const pdb = v.of('PodDisruptionBudget').find((p) => selectorMatches(p.spec.selector, x.labels));
        // A budget that allows no disruption at the pool's floor blocks node drains for good.
        const allowed = pdb.spec.maxUnavailable ?? hpa.spec.minReplicas - pdb.spec.minAvailable;
        assert.ok(allowed >= 1, `${key(pdb)} allows no disruption at ${hpa.spec.minReplicas} replicas`);
      }
    });

    await t.test('the ServiceMonitor scrapes both roles\' metrics ports, as deploy/prometheus does', () => {
      const sms = v.of('ServiceMonitor');
      assert.equal(sms.length, 1);
      const [sm] = sms;
      const scraped = v.of('Service').filter((s) => selectorMatches(sm.spec.selector, s.metadata.labels ?? {}) &&
        s.spec.ports.some((p) => sm.spec.endpoints.some((e) => e.port === p.name)));
      for (const x of v.deployments) {
        const svcs = scraped.filter((s) => selectorMatches({ matchLabels: s.spec.selector }, x.labels));
        assert.equal(svcs.length, 1, `${key(x.d)}'s pods must be scraped through exactly one Service`);
        const port = svcs[0].spec.ports.find((p) => sm.spec.endpoints.some((e) => e.port === p.name));
        assert.equal(port.port, hostPort(x.env.DUET_METRICS_LISTEN, 'DUET_METRICS_LISTEN').port);
      }
      // The job label is the Service name: the same job names as deploy/prometheus/prometheus.yml,
      // whose rules.yml matches on them, and the same interval as there (Grafana's timeInterval).
      const prom = YAML.parse(fs.readFileSync(path.join(REPO, 'deploy/prometheus/prometheus.yml'), 'utf8'));
      assert.deepEqual(scraped.map((s) => s.metadata.name).sort(), prom.scrape_configs.map((c) => c.job_name).sort());
      for (const e of sm.spec.endpoints) {
        assert.equal(e.path ?? '/metrics', '/metrics');
        assert.equal(e.interval, prom.global.scrape_interval, 'scrape interval differs from deploy/prometheus');
      }
    });

    await t.test('the Grafana dashboard ConfigMap is deploy/grafana/duet.json, unchanged', () => {
      const cms = v.of('ConfigMap').filter((c) => c.metadata.labels?.grafana_dashboard === '1');
      assert.equal(cms.length, 1, 'one ConfigMap labelled grafana_dashboard: "1"');
      // deploy/grafana/provisioning/dashboards/duet.yaml names it.
      assert.equal(cms[0].metadata.name, 'duet-grafana-dashboard');
      const source = fs.readFileSync(path.join(REPO, 'deploy/grafana/duet.json'), 'utf8');
      assert.ok(cms[0].data['duet.json'] === source,
        'deploy/k8s/base/grafana/duet.json has drifted from deploy/grafana/duet.json: ' +
        'cp deploy/grafana/duet.json deploy/k8s/base/grafana/duet.json');
    });
  });
}
