// Drives the unmodified `e2b` JS SDK (npm) against `ringfence serve`; the JS twin of
// tests/e2b/conformance.py.
//
// Run by scripts/conformance.sh, which starts a server, creates keys and exports
// E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY (and E2B_API_KEY_2 for a second tenant).
// The SDK reads all three itself (ConnectionConfig: E2B_API_URL -> apiUrl, E2B_SANDBOX_URL ->
// sandboxUrl, E2B_API_KEY -> apiKey); they are passed explicitly too so that a future SDK that
// stops reading one of them fails loudly here rather than silently talking to e2b.app.
// Each check prints one line; the first failure prints `FAILED: ...` on stderr and exits 1.

import { Sandbox, Volume, Secret, CommandExitError, NotEnoughSpaceError, NotFoundError } from 'e2b'
import net from 'node:net'
import http from 'node:http'

function env(name) {
  const v = process.env[name]
  if (!v) {
    console.error(`FAILED: ${name} is not set (run scripts/conformance.sh)`)
    process.exit(2)
  }
  return v
}

const conn = {
  apiUrl: env('E2B_API_URL'),
  sandboxUrl: env('E2B_SANDBOX_URL'),
  apiKey: env('E2B_API_KEY'),
}
const OTHER_KEY = process.env.E2B_API_KEY_2

let checks = 0

class CheckFailed extends Error {}

function check(name, cond, detail = '') {
  checks += 1
  if (!cond) throw new CheckFailed(`${name}: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`)
  console.log(`ok   ${name}`)
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Runs `fn`, expecting it to throw an instance of `cls`; returns the error (or null). */
async function expectThrow(fn, cls) {
  try {
    await fn()
  } catch (e) {
    if (e instanceof cls) return e
    throw e
  }
  return null
}

/** The SDK-level parts of conformance.py's bad_input: errors map to the right SDK classes. */
async function badInput() {
  const s = await Sandbox.create({ ...conn, timeoutMs: 60_000 })
  try {
    if (OTHER_KEY) {
      const other = { ...conn, apiKey: OTHER_KEY }
      const e = await expectThrow(() => Sandbox.getInfo(s.sandboxId, other), NotFoundError)
      check('other tenant cannot see it', e !== null, 'getInfo did not throw NotFoundError')
      check('other tenant cannot kill it', (await Sandbox.kill(s.sandboxId, other)) === false && (await s.isRunning()))
      const listed = await Sandbox.list(other).nextItems()
      check("other tenant's list excludes it", listed.every((x) => x.sandboxId !== s.sandboxId), listed.map((x) => x.sandboxId))
    }
    // Paths resolve inside the sandbox: climbing out lands on the sandbox's own root.
    const text = await s.files.read('/home/user/../../../../etc/passwd')
    check('path traversal stays inside', text.includes('user:x:1000:1000'), text.slice(0, 80))
    const e = await expectThrow(() => s.files.write('/home/user/huge.bin', new Uint8Array(80 << 20).buffer), NotEnoughSpaceError)
    check('upload beyond the disk quota is refused', e !== null, 'no NotEnoughSpaceError')
    check('sandbox still serves after a failed upload', (await s.commands.run('echo ok')).stdout === 'ok\n')
  } finally {
    await s.kill()
  }
}

async function main() {
  const a = await Sandbox.create({
    ...conn,
    timeoutMs: 120_000,
    metadata: { suite: 'conformance-js', which: 'a' },
    envs: { FOO: 'bar' },
  })
  const b = await Sandbox.create({ ...conn, timeoutMs: 120_000, metadata: { suite: 'conformance-js', which: 'b' } })
  try {
    // Commands: foreground, env, exit code.
    let r = await a.commands.run('echo hi')
    check('run foreground', r.stdout === 'hi\n' && r.exitCode === 0, r)
    check('sandbox env vars', (await a.commands.run('echo $FOO')).stdout === 'bar\n')
    check('runs as user', (await a.commands.run('whoami')).stdout.trim() === 'user')
    const ee = await expectThrow(() => a.commands.run('echo err >&2; exit 3'), CommandExitError)
    check('exit code raises', ee !== null && ee.exitCode === 3 && ee.stderr.includes('err'), ee ? { exitCode: ee.exitCode, stderr: ee.stderr } : 'no exception')

    // Streaming callbacks fire as output is produced.
    const seen = []
    await a.commands.run('for i in 1 2 3; do echo $i; sleep 0.1; done', { onStdout: (s) => seen.push(s) })
    check('onStdout streaming', JSON.stringify(seen.join('').split(/\s+/).filter(Boolean)) === '["1","2","3"]', seen)

    // Background, list, kill.
    let h = await a.commands.run('sleep 30', { background: true })
    const pids = (await a.commands.list()).map((p) => p.pid)
    check('background listed', pids.includes(h.pid), pids)
    check('kill background', (await a.commands.kill(h.pid)) === true)
    check('kill unknown pid', (await a.commands.kill(999999)) === false)

    // Stdin.
    h = await a.commands.run('cat', { background: true, stdin: true })
    await a.commands.sendStdin(h.pid, 'hello stdin\n')
    await a.commands.closeStdin(h.pid)
    r = await h.wait()
    check('stdin', r.stdout === 'hello stdin\n', r.stdout)

    // Reattach with connect.
    h = await a.commands.run('sleep 1; echo late', { background: true })
    const h2 = await a.commands.connect(h.pid)
    check('commands.connect', (await h2.wait()).stdout === 'late\n')

    // PTY.
    const out = []
    const p = await a.pty.create({ rows: 24, cols: 80, onData: (d) => out.push(Buffer.from(d)) })
    await a.pty.sendInput(p.pid, new TextEncoder().encode('stty size; echo pty-$((40+2)); exit\n'))
    await expectThrow(() => p.wait(), CommandExitError) // a nonzero exit is fine here
    const text = Buffer.concat(out).toString('utf8')
    check('pty session', text.includes('pty-42') && text.includes('24 80'), text.slice(-200))

    // Files.
    await a.files.write('/home/user/a.txt', 'x')
    check('files write/read', (await a.files.read('/home/user/a.txt')) === 'x')
    const names = (await a.files.list('/home/user')).map((e) => e.name)
    check('files list', names.includes('a.txt'), names)
    check('files exists', (await a.files.exists('/home/user/a.txt')) && !(await a.files.exists('/home/user/nope')))
    check('files makeDir', (await a.files.makeDir('/home/user/d')) === true)
    await a.files.rename('/home/user/a.txt', '/home/user/d/b.txt')
    check('files rename', (await a.files.exists('/home/user/d/b.txt')) && !(await a.files.exists('/home/user/a.txt')))
    await a.files.remove('/home/user/d/b.txt')
    check('files remove', !(await a.files.exists('/home/user/d/b.txt')))
    const big = new Uint8Array(256 * 12000)
    for (let i = 0; i < big.length; i++) big[i] = i & 0xff
    await a.files.write('/tmp/big.bin', big.buffer)
    const got = await a.files.read('/tmp/big.bin', { format: 'bytes' })
    check('files binary 3 MB', Buffer.from(got).equals(Buffer.from(big)), `got ${got.length} bytes`)
    // JS-only upload paths (not in conformance.py): the SDK switches from multipart to a raw
    // application/octet-stream body for gzip and for ReadableStream data (envd >= 0.5.7).
    await a.files.write('/tmp/big.gz.bin', big.buffer, { gzip: true })
    const gz = await a.files.read('/tmp/big.gz.bin', { format: 'bytes' })
    check('files write gzip (octet-stream)', Buffer.from(gz).equals(Buffer.from(big)), `got ${gz.length} bytes`)
    const enc = new TextEncoder()
    await a.files.write('/tmp/s.txt', new ReadableStream({
      start(c) { c.enqueue(enc.encode('stream-')); c.enqueue(enc.encode('data')); c.close() },
    }))
    check('files write stream', (await a.files.read('/tmp/s.txt')) === 'stream-data')

    // Watch: the JS SDK streams events to a callback.
    const evs = []
    const w = await a.files.watchDir('/home/user/d', (e) => evs.push(e))
    await a.files.write('/home/user/d/w.txt', 'w')
    for (let i = 0; i < 20 && !evs.some((e) => e.name.endsWith('w.txt')); i++) await sleep(100)
    await w.stop()
    check('files watch', evs.some((e) => e.name.endsWith('w.txt')), evs)

    // Isolation between the two sandboxes.
    check('sandboxes are separate', !(await b.files.exists('/home/user/d')))
    check('second sandbox runs', (await b.commands.run('echo b')).stdout === 'b\n')

    // Lifecycle: timeout, info, list, connect.
    await a.setTimeout(90_000)
    const info = await a.getInfo()
    check('getInfo', info.sandboxId === a.sandboxId && info.metadata?.which === 'a', info)
    const ids = new Set((await Sandbox.list(conn).nextItems()).map((s) => s.sandboxId))
    check('list', ids.has(a.sandboxId) && ids.has(b.sandboxId), [...ids])
    const c = await Sandbox.connect(a.sandboxId, conn)
    check('connect', (await c.commands.run('cat /home/user/d/w.txt')).stdout === 'w')
    check('isRunning', await a.isRunning())
  } finally {
    await a.kill()
    await b.kill()
  }
  check('killed', !(await a.isRunning()))
  check('kill again is false', (await Sandbox.kill(a.sandboxId, conn)) === false)
  console.log(`${checks} passed, 0 failed`)
}

// Volumes and their content API (the SDK sends content calls to E2B_VOLUME_API_URL, which
// scripts/conformance.sh points at the server), with no sandbox running.
async function volumes() {
  const vol = await Volume.create(`js-vol-${Date.now()}`, conn)
  check('Volume.create', vol.volumeId && vol.token, vol.volumeId)
  await vol.writeFile('/js/hello.txt', 'from js', { force: true })
  check('Volume writeFile/readFile', (await vol.readFile('/js/hello.txt')) === 'from js')
  const names = (await vol.list('/', { depth: 2 })).map((e) => e.path).sort()
  check('Volume list', JSON.stringify(names) === JSON.stringify(['/js', '/js/hello.txt']), names)
  const listed = (await Volume.list(conn)).map((v) => v.volumeId)
  check('Volume.list', listed.includes(vol.volumeId), listed)
  check('Volume.destroy', (await Volume.destroy(vol.volumeId, conn)) === true)
}

// A volume mounted by two sandboxes, pause and resume through connect, a snapshot used as a
// template, and metrics, as the JS SDK sends them (the Python suites go deeper: volumes.py,
// lifecycle.py, extras.py).
async function lifecycleAndMounts() {
  const vol = await Volume.create(`js-mnt-${Date.now()}`, conn)
  const opts = { ...conn, timeoutMs: 120_000 }
  const a = await Sandbox.create({ ...opts, volumeMounts: { '/mnt/shared': vol } })
  const b = await Sandbox.create({ ...opts, volumeMounts: { '/data': vol } })
  let c = null
  try {
    await a.files.write('/mnt/shared/from-a.txt', 'written by a')
    check('volumeMounts: another sandbox reads the first one\'s write at its own path',
      (await b.files.read('/data/from-a.txt')) === 'written by a')
    check('volumeMounts: the volume\'s content API sees it',
      (await vol.readFile('/from-a.txt')) === 'written by a')
    let destroyed = null
    let refused = null
    try { destroyed = await Volume.destroy(vol.volumeId, conn) } catch (e) { refused = e }
    check('Volume.destroy refused while mounted', refused !== null || destroyed === false,
      String(refused ?? destroyed))
    check('the mounted volume is still there', (await vol.readFile('/from-a.txt')) === 'written by a')

    await a.commands.run('echo kept > /tmp/state')
    check('betaPause', (await a.betaPause()) === true)
    const paused = await Sandbox.getInfo(a.sandboxId, conn)
    check('getInfo reads paused', paused.state === 'paused', paused.state)
    const back = await Sandbox.connect(a.sandboxId, opts)
    check('connect resumes it with its files',
      (await back.commands.run('cat /tmp/state')).stdout.trim() === 'kept')
    check('getInfo reads running again', (await back.getInfo()).state === 'running')

    const snap = await back.createSnapshot()
    check('createSnapshot returns an id', typeof snap?.snapshotId === 'string' && snap.snapshotId.length > 0, snap)
    c = await Sandbox.create(snap.snapshotId, opts)
    check('a sandbox from the snapshot has its files',
      (await c.commands.run('cat /tmp/state')).stdout.trim() === 'kept')
    check('the snapshot\'s source keeps running', (await back.commands.run('echo up')).stdout.trim() === 'up')

    // Metrics are sampled every few seconds: wait for the first one.
    let metrics = []
    for (let i = 0; i < 40 && metrics.length === 0; i++) {
      metrics = await back.getMetrics()
      if (metrics.length === 0) await new Promise((r) => setTimeout(r, 250))
    }
    const m = metrics[metrics.length - 1]
    check('getMetrics: a sample with CPU count and memory', m && m.cpuCount >= 1 && m.memTotal > 0, m)
  } finally {
    await Promise.allSettled([a.kill(), b.kill(), c?.kill()].filter(Boolean))
  }
  check('Volume.destroy once nothing mounts it', (await Volume.destroy(vol.volumeId, conn)) === true)
}

/** Listens on 127.0.0.2 (exempted from the conformance server's ceiling for this), port 0. */
function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.2', () => resolve(server.address().port))
  })
}

/**
 * A tiny SOCKS5 proxy (RFC 1928 + password auth, RFC 1929) that logs each tunnel asked for as
 * "host:port user=NAME" and serves every tunnel from `servePort` on 127.0.0.2: it stands in
 * for the internet, so the sandbox's destinations are documentation addresses.
 */
function socks5(log, servePort, user, pass) {
  return net.createServer((c) => {
    let buf = Buffer.alloc(0)
    let stage = 'greet'
    const take = (n) => {
      const b = buf.subarray(0, n)
      buf = buf.subarray(n)
      return b
    }
    const onData = (d) => {
      buf = Buffer.concat([buf, d])
      if (stage === 'greet' && buf.length >= 2 && buf.length >= 2 + buf[1]) {
        const methods = take(2 + buf[1]).subarray(2)
        if (!methods.includes(2)) return c.end(Buffer.from([5, 0xff]))
        c.write(Buffer.from([5, 2]))
        stage = 'auth'
      }
      if (stage === 'auth' && buf.length >= 2 && buf.length >= 3 + buf[1] && buf.length >= 3 + buf[1] + buf[2 + buf[1]]) {
        const ul = buf[1]
        const u = buf.subarray(2, 2 + ul).toString()
        const pl = buf[2 + ul]
        const p = buf.subarray(3 + ul, 3 + ul + pl).toString()
        take(3 + ul + pl)
        if (u !== user || p !== pass) return c.end(Buffer.from([1, 1]))
        c.write(Buffer.from([1, 0]))
        stage = 'request'
      }
      if (stage === 'request' && buf.length >= 10 && buf[3] === 1) {
        const r = take(10)
        const target = `${r[4]}.${r[5]}.${r[6]}.${r[7]}:${r.readUInt16BE(8)}`
        log.push(`${target} user=${user}`)
        stage = 'tunnel'
        c.off('data', onData)
        const up = net.connect(servePort, '127.0.0.2', () => {
          c.write(Buffer.from([5, 0, 0, 1, 0, 0, 0, 0, 0, 0]))
          if (buf.length) up.write(buf)
          c.pipe(up)
          up.pipe(c)
        })
        up.on('error', () => c.destroy())
        c.on('error', () => up.destroy())
      }
    }
    c.on('data', onData)
    c.on('error', () => {})
  })
}

/** Secrets through the JS SDK, and `network.rules` + `egressProxy` as the JS SDK sends them. */
async function vaultAndProxy() {
  const name = `js-tok-${Date.now()}`
  const VALUE = 'js-secret-value-4d3c2b1a'
  const info = await Secret.create(name, VALUE, conn)
  check('Secret.create', info.name === name && !JSON.stringify(info).includes(VALUE), info)
  check('Secret.exists', (await Secret.exists(name, conn)) === true)
  check('Secret.getInfo', (await Secret.getInfo(name, conn)).name === name)
  const page = await Secret.list(conn).nextItems()
  check('Secret.list', page.some((x) => x.name === name), page.map((x) => x.name))
  const placeholder = Secret.fill(name)
  check('Secret.fill is the placeholder', placeholder === `\${e2b.secrets.${name}}`, placeholder)

  // An egressProxy outside the ceiling: refused naming it.
  let refused = null
  try {
    await Sandbox.create({ ...conn, timeoutMs: 30_000, network: { egressProxy: { address: '127.0.0.1:1080' } } })
  } catch (e) {
    refused = e
  }
  check('egressProxy on the host loopback refused naming it', refused && /127\.0\.0\.1/.test(String(refused)), String(refused))

  const log = []
  const seen = []
  const web = http.createServer((req, res) => {
    seen.push(JSON.stringify(req.headers))
    res.end(JSON.stringify(req.headers))
  })
  let webPort
  try {
    webPort = await listen(web)
  } catch (e) {
    console.log(`SKIPPED egressProxy through a proxy (JS): cannot listen on 127.0.0.2: ${e}`)
    web.close()
    return
  }
  const proxy2 = socks5(log, webPort, 'js', 'js-proxy-pw')
  const proxyPort = await listen(proxy2)
  const network = {
    denyOut: ['203.0.113.8:80'],
    rules: { 'api.scoped.test': [{ transform: { headers: { Authorization: `Bearer ${placeholder}` } } }] },
    egressProxy: { address: `127.0.0.2:${proxyPort}`, username: 'js', password: 'js-proxy-pw' },
  }
  let s
  try {
    s = await Sandbox.create({ ...conn, timeoutMs: 60_000, envs: { TOKEN: placeholder }, network })
  } catch (e) {
    if (/outside what this server lets/.test(String(e))) {
      console.log(`SKIPPED egressProxy through a proxy (JS): the server does not exempt 127.0.0.2: ${e}`)
      web.close()
      proxy2.close()
      return
    }
    throw e
  }
  try {
    check('the sandbox env holds the placeholder only', (await s.commands.run('echo -n "$TOKEN"')).stdout === placeholder)
    // Through the proxy, to a host the rule does not scope: the placeholder goes as written.
    const r = await s.commands.run('curl -sS -m 10 -H "X-Key: $TOKEN" http://203.0.113.7/')
    check('egressProxy (JS form) carries the sandbox connection', log.includes('203.0.113.7:80 user=js'), log)
    check('a placeholder is not substituted for a host outside its scope',
      r.stdout.includes(placeholder) && !r.stdout.includes(VALUE) && !seen.join().includes(VALUE), r.stdout)
    let denied
    try {
      denied = (await s.commands.run('curl -sS -m 10 http://203.0.113.8/')).stdout
    } catch (e) {
      denied = String(e)
    }
    check('a denied destination never reaches the proxy', !log.some((x) => x.startsWith('203.0.113.8')) && !denied.includes('x-key'), log)
    const got = await s.getInfo()
    const shown = JSON.stringify(got.network ?? {})
    check('getInfo shows the proxy and rules, never the password',
      shown.includes(`127.0.0.2:${proxyPort}`) && shown.includes('api.scoped.test') && !shown.includes('js-proxy-pw'), shown)
    await s.updateNetwork({ denyOut: ['203.0.113.8:80'] })
    const before = log.length
    try {
      await s.commands.run('curl -sS -m 3 http://203.0.113.7/')
    } catch (e) {
      // Direct now: the documentation address is not routed.
    }
    check('updateNetwork without egressProxy goes direct', log.length === before, log)
  } finally {
    await s.kill()
    web.close()
    proxy2.close()
  }
  check('Secret.destroy', (await Secret.destroy(name, conn)) === true && (await Secret.exists(name, conn)) === false)
}

try {
  await badInput()
  await volumes()
  await lifecycleAndMounts()
  await vaultAndProxy()
  await main()
} catch (e) {
  // One line with the reason, then (for anything but a failed check) the stack.
  console.error(`FAILED: ${e instanceof CheckFailed ? 'AssertionError' : e?.name}: ${e?.message ?? e}`)
  if (!(e instanceof CheckFailed)) console.error(e?.stack ?? e)
  process.exit(1)
}
