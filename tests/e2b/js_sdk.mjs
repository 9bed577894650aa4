// E2B's official JS SDK (npm `e2b`, pinned by the test, unmodified) against agentd.
//
// Configured only by environment variables, as a user would: E2B_API_URL, E2B_SANDBOX_URL,
// E2B_API_KEY; plus AGENTD_HOST_PORT (agentd's TCP address, for the origin `getHost` names:
// no wildcard DNS here) and PROBE (the probe binary, uploaded with the SDK and run as a web
// server inside). Every call tried is printed with its result as one JSON document; the
// first failed check ends the run with status 1.

import { readFileSync } from 'node:fs'
import http from 'node:http'
import { Sandbox, CommandExitError } from 'e2b'

const tried = []
function check(call, ok, detail = '') {
  tried.push({ call, ok: Boolean(ok), detail: String(detail).slice(0, 300) })
  if (!ok) {
    console.log(JSON.stringify(tried, null, 1))
    process.exit(1)
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function get(host, token) {
  const [addr, port] = process.env.AGENTD_HOST_PORT.split(':')
  return new Promise((resolve) => {
    const req = http.request(
      { host: addr, port: Number(port), path: '/', headers: { Host: host, 'e2b-traffic-access-token': token } },
      (res) => {
        let body = ''
        res.on('data', (d) => (body += d))
        res.on('end', () => resolve({ status: res.statusCode, body }))
      },
    )
    req.on('error', (e) => resolve({ status: 0, body: String(e) }))
    req.end()
  })
}

const suite = 'js-' + Math.random().toString(16).slice(2, 10)
const t = Date.now()
const sbx = await Sandbox.create('opencode', { timeoutMs: 120_000, metadata: { suite } })
check('Sandbox.create', sbx.sandboxId, `${sbx.sandboxId} in ${Date.now() - t} ms`)

const out = []
const r = await sbx.commands.run('for i in 1 2 3; do echo line $i; done; echo to-err >&2', {
  onStdout: (d) => out.push(d),
})
check(
  'commands.run (streamed)',
  r.exitCode === 0 && r.stdout === 'line 1\nline 2\nline 3\n' && r.stderr === 'to-err\n' && out.join('') === r.stdout,
  JSON.stringify([r.stdout, r.stderr, out]),
)
try {
  await sbx.commands.run('exit 3')
  check('commands.run (exit 3 throws)', false, 'no error')
} catch (e) {
  check('commands.run (exit 3 throws)', e instanceof CommandExitError && e.exitCode === 3, e)
}

const bg = await sbx.commands.run('sleep 300', { background: true })
const pids = (await sbx.commands.list()).map((p) => p.pid)
check('commands.run (background) + commands.list', pids.includes(bg.pid), pids)
check('commands.kill', (await sbx.commands.kill(bg.pid)) === true)

const cat = await sbx.commands.run('cat; echo done', { background: true, stdin: true })
await sbx.commands.sendStdin(cat.pid, 'ping\n')
await sbx.commands.closeStdin(cat.pid)
const catOut = await cat.wait()
check('commands.sendStdin + closeStdin', catOut.stdout === 'ping\ndone\n', JSON.stringify(catOut.stdout))

let seen = ''
const dec = new TextDecoder()
const pty = await sbx.pty.create({ cols: 100, rows: 30, onData: (d) => (seen += dec.decode(d)) })
await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size; exit 0\n'))
await pty.wait()
check('pty.create + sendInput', seen.includes('30 100'), JSON.stringify(seen.slice(-200)))

await sbx.files.write('/tmp/js/a.txt', 'hello js')
check('files.write + read', (await sbx.files.read('/tmp/js/a.txt')) === 'hello js')
const names = (await sbx.files.list('/tmp/js')).map((e) => e.name)
check('files.list', JSON.stringify(names) === '["a.txt"]', names)
check('files.makeDir', (await sbx.files.makeDir('/home/agent/jsdir')) === true)
const moved = await sbx.files.rename('/tmp/js/a.txt', '/home/agent/jsdir/b.txt')
check('files.rename', moved.path === '/home/agent/jsdir/b.txt', JSON.stringify(moved))
await sbx.files.remove('/home/agent/jsdir')
check('files.remove + exists', (await sbx.files.exists('/home/agent/jsdir')) === false)

await sbx.files.makeDir('/tmp/watched')
const events = []
const w = await sbx.files.watchDir('/tmp/watched', (e) => events.push([e.type, e.name]), { timeoutMs: 0 })
await sbx.files.write('/tmp/watched/new.txt', 'x')
for (let i = 0; i < 50 && !events.some(([t, n]) => t === 'create' && n === 'new.txt'); i++) await sleep(100)
await w.stop()
check('files.watchDir (streamed)', events.some(([t, n]) => t === 'create' && n === 'new.txt'), JSON.stringify(events))

await sbx.files.write('/home/agent/probe', readFileSync(process.env.PROBE).buffer)
await sbx.commands.run('chmod +x /home/agent/probe')
await sbx.commands.run('/home/agent/probe http 8000', { background: true })
const host = sbx.getHost(8000)
let page = { status: 0, body: '' }
for (let i = 0; i < 50; i++) {
  page = await get(host, sbx.trafficAccessToken ?? '')
  if (page.status === 200) break
  await sleep(200)
}
check('getHost (HTTP server inside)', page.body.includes('hello from port 8000'), JSON.stringify(page))

const brief = await Sandbox.create('opencode', { timeoutMs: 3_000 })
check('Sandbox.create (3 s timeout)', await brief.isRunning())
await sleep(6_000)
check('timeout expired', (await brief.isRunning()) === false)

const found = await Sandbox.list({ query: { metadata: { suite } } }).nextItems()
check('Sandbox.list (metadata)', found.length === 1 && found[0].sandboxId === sbx.sandboxId, JSON.stringify(found))
const info = await sbx.getInfo()
check('Sandbox.getInfo', info.metadata.suite === suite, JSON.stringify(info))
await sbx.setTimeout(60_000)
check('Sandbox.setTimeout', await sbx.isRunning())
check('Sandbox.kill', (await Sandbox.kill(sbx.sandboxId)) === true)
check('Sandbox.isRunning (killed)', (await sbx.isRunning()) === false)

console.log(JSON.stringify(tried, null, 1))
