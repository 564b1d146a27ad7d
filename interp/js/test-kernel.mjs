// Tests of ringfence_kernel.js: `node --test interp/js/` (Node 18 or later, no dependencies).
//
// Every test starts a kernel, once as `node ringfence_kernel.js` and once as
// `node -e "<its source>"`, speaks interp/PROTOCOL.md to it and checks the exact messages.
// Every line the kernel writes must be a JSON object (checked when the kernel is closed).
// The name is test-kernel.mjs rather than test_kernel.mjs because `node --test <dir>` on Node 18
// and 20 only picks up test.*, test-*, *.test.*, *-test.* and *_test.* files.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const KERNEL = fileURLToPath(new URL('./ringfence_kernel.js', import.meta.url));
const SOURCE = readFileSync(KERNEL, 'utf8');
const TIMESTAMP = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Kernels of failed tests are killed at the end, or the test process would wait for them.
const started = new Set();
after(() => {
  for (const k of started) k.proc.kill('SIGKILL');
});

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitFor(condition, ms, what) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail('timed out waiting for ' + what);
    await sleep(20);
  }
}

class Kernel {
  constructor(mode, env = process.env) {
    const args = mode === 'eval' ? ['-e', SOURCE] : mode === 'ts' ? ['-e', SOURCE, '--', '--typescript'] : [KERNEL];
    this.proc = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'pipe'], env });
    started.add(this);
    this.proc.on('exit', () => started.delete(this));
    this.messages = []; // { msg, at } in arrival order
    this.cursor = 0;
    this.badLines = [];
    this.stderr = '';
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    this.wake = null;
    let buf = '';
    this.proc.stdout.setEncoding('utf8');
    this.proc.stdout.on('data', (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let msg;
        try {
          msg = JSON.parse(line);
        } catch {
          msg = undefined;
        }
        if (!msg || typeof msg !== 'object' || Array.isArray(msg)) this.badLines.push(line);
        else this.messages.push({ msg, at: performance.now() });
      }
      if (this.wake) this.wake();
    });
    this.proc.stderr.setEncoding('utf8');
    this.proc.stderr.on('data', (d) => (this.stderr += d));
    this.seq = 0;
  }

  static async start(mode, env) {
    const k = new Kernel(mode, env);
    const { msg } = await k.take(10000);
    assert.deepEqual(msg, { type: 'ready', language: mode === 'ts' ? 'typescript' : 'javascript', pid: k.proc.pid });
    return k;
  }

  // The next message, in order.
  async take(ms = 10000) {
    const deadline = Date.now() + ms;
    while (this.cursor >= this.messages.length) {
      const left = deadline - Date.now();
      if (left <= 0) assert.fail('no message from the kernel within ' + ms + ' ms; stderr: ' + this.stderr);
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
    }
    return this.messages[this.cursor++];
  }

  send(obj) {
    this.proc.stdin.write(JSON.stringify(obj) + '\n');
  }

  execute(code, envVars = null) {
    const id = 'exec-' + ++this.seq;
    const sentAt = performance.now();
    this.send({ op: 'execute', id, code, env_vars: envVars });
    return { id, sentAt };
  }

  // All messages of execution `id` up to its end_of_execution, checked for id and timestamp,
  // which are then removed; `timed` keeps the arrival times.
  async collect(id, ms = 10000) {
    const msgs = [];
    const timed = [];
    for (;;) {
      const { msg, at } = await this.take(ms);
      assert.equal(msg.id, id, 'message of another execution: ' + JSON.stringify(msg));
      const m = { ...msg };
      delete m.id;
      if (m.type === 'stdout' || m.type === 'stderr') {
        assert.match(m.timestamp, TIMESTAMP);
        delete m.timestamp;
      }
      msgs.push(m);
      timed.push({ msg: m, at });
      if (m.type === 'end_of_execution') return { msgs, timed };
    }
  }

  async run(code, envVars = null, ms) {
    const { id } = this.execute(code, envVars);
    return (await this.collect(id, ms)).msgs;
  }

  async close() {
    this.proc.stdin.end();
    const exit = await Promise.race([this.exited, sleep(5000).then(() => null)]);
    if (!exit) this.proc.kill('SIGKILL');
    assert.deepEqual(this.badLines, [], 'lines that are not JSON objects');
    assert.ok(exit, 'the kernel did not exit at EOF');
    return exit;
  }
}

// Helpers for expected messages.
const count = (n) => ({ type: 'number_of_executions', execution_count: n });
const result = (text) => ({ type: 'result', text, is_main_result: true });
const end = { type: 'end_of_execution' };
const out = (text) => ({ type: 'stdout', text });
const streamText = (msgs, type) => msgs.filter((m) => m.type === type).map((m) => m.text).join('');
const without = (msgs, ...types) => msgs.filter((m) => !types.includes(m.type));

function checkError(msg, name, value) {
  assert.equal(msg.type, 'error');
  assert.equal(msg.name, name);
  if (value !== undefined) assert.equal(msg.value, value);
  assert.equal(typeof msg.traceback, 'string');
}

for (const mode of ['file', 'eval']) {
  describe(`kernel started as ${mode === 'file' ? 'node ringfence_kernel.js' : 'node -e <source>'}`, () => {
    test('values, state between cells, execution count', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(await k.run('x = 1'), [count(1), result('1'), end]);
      assert.deepEqual(await k.run('x + 1'), [count(2), result('2'), end]);
      assert.deepEqual(await k.run('"a string"'), [count(3), result('a string'), end]);
      assert.deepEqual(await k.run('undefined'), [count(4), end]);
      assert.deepEqual(await k.run(''), [count(5), end]);
      assert.deepEqual(await k.run("({ a: 1, s: 'x', n: [1, 2] })"), [count(6), result("{ a: 1, s: 'x', n: [ 1, 2 ] }"), end]);
      assert.deepEqual(await k.run('null'), [count(7), result('null'), end]);
      assert.deepEqual(await k.run('10n ** 20n'), [count(8), result('100000000000000000000n'), end]);
      assert.deepEqual(await k.run('Promise.resolve(3)'), [count(9), result('Promise { 3 }'), end]);
      await k.close();
    });

    test('let, const, function and class declarations persist and may be declared again', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(await k.run('let a = 1; const b = 2; function f() { return a + b; } class K { get v() { return 4; } }'), [count(1), end]);
      assert.deepEqual(await k.run('f() + new K().v'), [count(2), result('7'), end]);
      assert.deepEqual(await k.run('a = 10; f()'), [count(3), result('12'), end]);
      assert.deepEqual(await k.run('let a = 20; const b = 30; a + b'), [count(4), result('50'), end]);
      assert.deepEqual(await k.run('const w = await Promise.resolve(5); let v = w * 2;'), [count(5), end]);
      assert.deepEqual(await k.run('v + w'), [count(6), result('15'), end]);
      await k.close();
    });

    test('top-level await: the cell ends when the promise settles', async () => {
      const k = await Kernel.start(mode);
      const { id, sentAt } = k.execute('await new Promise(r => setTimeout(r, 300)); 5');
      const { msgs, timed } = await k.collect(id);
      assert.deepEqual(msgs, [count(1), result('5'), end]);
      assert.ok(timed[1].at - sentAt >= 290, 'result came before the timer');
      await k.close();
    });

    test('console.log streams while the cell runs', async () => {
      const k = await Kernel.start(mode);
      const { id } = k.execute("console.log('first'); await new Promise(r => setTimeout(r, 1000)); console.log('second'); 42");
      const { msgs, timed } = await k.collect(id);
      assert.deepEqual(msgs, [count(1), out('first\n'), out('second\n'), result('42'), end]);
      assert.ok(timed[2].at - timed[1].at >= 900, 'the first line came only at the end');
      await k.close();
    });

    test('console.error, process.stdout/stderr.write and fs.writeSync(1)', async () => {
      const k = await Kernel.start(mode);
      const msgs = await k.run("console.error('oops'); process.stdout.write('no newline'); process.stderr.write('e2\\n'); require('fs').writeSync(1, ' fd1\\n'); 1");
      // stdout and stderr are separate streams: their relative order is not kept.
      assert.deepEqual(without(msgs, 'stdout', 'stderr'), [count(1), result('1'), end]);
      assert.equal(streamText(msgs, 'stdout'), 'no newline fd1\n');
      assert.equal(streamText(msgs, 'stderr'), 'oops\ne2\n');
      await k.close();
    });

    test('subprocesses with inherited stdio write into the cell, never into the channel', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(
        await k.run("require('child_process').execSync('echo hi', { stdio: 'inherit' }); 'done'"),
        [count(1), out('hi\n'), result('done'), end],
      );
      const fake = JSON.stringify({ type: 'end_of_execution', id: 'exec-2' });
      const msgs = await k.run(
        "console.log('a'); require('child_process').execSync(" +
          JSON.stringify(`echo '${fake}'; echo b >&2; echo c`) +
          ", { stdio: 'inherit' }); console.log('d')",
      );
      assert.deepEqual(without(msgs, 'stdout', 'stderr'), [count(2), end]);
      assert.equal(streamText(msgs, 'stdout'), 'a\n' + fake + '\nc\nd\n');
      assert.equal(streamText(msgs, 'stderr'), 'b\n');
      await k.close();
    });

    test('large, many and non-ASCII outputs arrive whole and in order', async () => {
      const k = await Kernel.start(mode);
      let msgs = await k.run("console.log('x'.repeat(300000)); 'end'");
      assert.equal(streamText(msgs, 'stdout'), 'x'.repeat(300000) + '\n');
      assert.ok(msgs.filter((m) => m.type === 'stdout').every((m) => m.text.length <= 65536));
      assert.deepEqual(msgs.slice(-2), [result('end'), end]);
      msgs = await k.run('for (let i = 0; i < 2000; i++) console.log(i)');
      assert.equal(streamText(msgs, 'stdout'), Array.from({ length: 2000 }, (_, i) => i + '\n').join(''));
      assert.deepEqual(await k.run("console.log('héllo ✓ 😀 \\u0000 \\u001b[1m'); 'ünï'"), [count(3), out('héllo ✓ 😀 \u0000 \u001b[1m\n'), result('ünï'), end]);
      await k.close();
    });

    test('errors: name, value and traceback', async () => {
      const k = await Kernel.start(mode);
      let msgs = await k.run('nope');
      assert.equal(msgs.length, 3);
      checkError(msgs[1], 'ReferenceError', 'nope is not defined');
      assert.equal(msgs[1].traceback, 'ReferenceError: nope is not defined\n    at <cell-1>:1:1');

      msgs = await k.run("console.log('before');\nfunction g() { throw new TypeError('boom'); }\ng()");
      assert.deepEqual(msgs[1], out('before\n'));
      checkError(msgs[2], 'TypeError', 'boom');
      assert.equal(msgs[2].traceback, 'TypeError: boom\n    at g (<cell-2>:2:22)\n    at <cell-2>:3:1');
      assert.deepEqual(msgs[3], end);

      msgs = await k.run("await new Promise(r => setTimeout(r, 10)); throw new RangeError('later')");
      checkError(msgs[1], 'RangeError', 'later');

      msgs = await k.run('let y = ;');
      checkError(msgs[1], 'SyntaxError', "Unexpected token ';'");
      assert.equal(msgs[1].traceback, "<cell-4>:1\nlet y = ;\n        ^\n\nSyntaxError: Unexpected token ';'");

      msgs = await k.run("throw 'just a string'");
      assert.deepEqual(msgs[1], { type: 'error', name: 'Error', value: 'just a string', traceback: "Uncaught 'just a string'" });

      assert.deepEqual(await k.run('1 + 1'), [count(6), result('2'), end]);
      await k.close();
    });

    test('errors of earlier cells\' timers and rejections do not kill the kernel', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(await k.run("setTimeout(() => { throw new Error('late') }, 50); setTimeout(() => Promise.reject(new Error('rejected')), 60); 1"), [count(1), result('1'), end]);
      await sleep(300);
      assert.deepEqual(await k.run('2'), [count(2), result('2'), end]);
      // while a cell runs, they show on its stderr
      const msgs = await k.run("setTimeout(() => { throw new Error('inside') }, 10); await new Promise(r => setTimeout(r, 200)); 'alive'");
      assert.deepEqual(without(msgs, 'stderr'), [count(3), result('alive'), end]);
      assert.match(streamText(msgs, 'stderr'), /^Uncaught Error: inside\n    at Timeout\._onTimeout \(<cell-3>:1:26\)/);
      await k.close();
    });

    test('interrupt a synchronous infinite loop; state is kept', async () => {
      const k = await Kernel.start(mode);
      const { id } = k.execute('let keep = 7; while (true) {}');
      assert.deepEqual((await k.take()).msg, { type: 'number_of_executions', id, execution_count: 1 });
      await sleep(200);
      const t = performance.now();
      k.send({ op: 'interrupt', id });
      const { msgs } = await k.collect(id);
      assert.ok(performance.now() - t < 2000, 'interrupt took too long');
      assert.deepEqual(msgs, [{ type: 'error', name: 'Interrupted', value: 'Execution interrupted', traceback: 'Interrupted: Execution interrupted' }, end]);
      assert.deepEqual(await k.run('keep'), [count(2), result('7'), end]);
      await k.close();
    });

    test('interrupt a cell waiting on a promise that never settles', async () => {
      const k = await Kernel.start(mode);
      const { id } = k.execute('globalThis.mark = 1; await new Promise(() => {})');
      await k.take();
      await sleep(200);
      const t = performance.now();
      k.send({ op: 'interrupt', id });
      const { msgs } = await k.collect(id);
      assert.ok(performance.now() - t < 1000, 'interrupt took too long');
      checkError(msgs[0], 'Interrupted');
      assert.deepEqual(await k.run('mark'), [count(2), result('1'), end]);
      // SIGINT to the kernel's process does the same
      const second = k.execute('await new Promise(() => {})');
      await k.take();
      await sleep(100);
      k.proc.kill('SIGINT');
      checkError((await k.collect(second.id)).msgs[0], 'Interrupted');
      assert.deepEqual(await k.run('mark + 1'), [count(4), result('2'), end]);
      await k.close();
    });

    test('interrupt loops after an await and in a timer callback; a subprocess', async () => {
      const k = await Kernel.start(mode);
      for (const code of [
        'await new Promise(r => setTimeout(r, 10)); while (true) {}',
        'setTimeout(() => { while (true) {} }, 10); await new Promise(r => setTimeout(r, 60000))',
        "require('child_process').spawnSync('sleep', ['30']); while (true) {}",
      ]) {
        const { id } = k.execute(code);
        await k.take();
        await sleep(300);
        const t = performance.now();
        k.send({ op: 'interrupt', id });
        const { msgs } = await k.collect(id);
        assert.ok(performance.now() - t < 2000, 'interrupt took too long: ' + code);
        checkError(msgs[0], 'Interrupted');
      }
      // stray interrupts (ended or unknown executions) are ignored
      k.send({ op: 'interrupt', id: 'exec-1' });
      k.send({ op: 'interrupt', id: 'nobody' });
      assert.deepEqual(await k.run("await new Promise(r => setTimeout(r, 300)); 'ok'"), [count(4), result('ok'), end]);
      await k.close();
    });

    test('a cell that ignores the interrupt: the context is restarted, empty', async () => {
      const k = await Kernel.start(mode, { ...process.env, RINGFENCE_INTERRUPT_KILL_MS: '1000' });
      const { id } = k.execute(`x = 1; require('child_process').execSync('trap "" INT; sleep 30')`);
      await k.take();
      await sleep(200);
      const t = performance.now();
      k.send({ op: 'interrupt', id });
      const { msgs } = await k.collect(id);
      const took = performance.now() - t;
      assert.ok(took > 900 && took < 3000, 'took ' + took + ' ms');
      checkError(msgs[0], 'Interrupted', 'Execution interrupted (the JavaScript process did not survive the interrupt; a fresh one was started, its state is lost)');
      assert.deepEqual(await k.run('[typeof x, process.env.RINGFENCE_INTERRUPT_KILL_MS]'), [count(2), result("[ 'undefined', undefined ]"), end]);
      await k.close();
    });

    test('env_vars apply to one cell; set_env replaces the environment', async () => {
      const k = await Kernel.start(mode, { ...process.env, RF_PRE: 'orig' });
      const code = "[process.env.RF_TEST, process.env.RF_PRE, require('child_process').execSync('echo $RF_TEST').toString().trim()].join(',')";
      assert.deepEqual(await k.run(code, { RF_TEST: 'yes', RF_PRE: 'tmp' }), [count(1), result('yes,tmp,yes'), end]);
      assert.deepEqual(await k.run(code), [count(2), result(',orig,'), end]);
      k.send({ op: 'set_env', env: { ONLY: '1', PATH: process.env.PATH } });
      assert.deepEqual(await k.run('Object.keys(process.env).sort().join()'), [count(3), result('ONLY,PATH'), end]);
      await k.close();
    });

    test('import statements and import()', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(
        await k.run("import path from 'node:path';\nimport { join as j, sep } from 'node:path'\nimport * as os from 'node:os'\nj('a', 'b') + sep + typeof os.cpus"),
        [count(1), result('a/b/function'), end],
      );
      assert.deepEqual(await k.run("const { EOL } = await import('node:os'); [EOL, 'import(x)', path.sep]"), [count(2), result("[ '\\n', 'import(x)', '/' ]"), end]);
      await k.close();
    });

    test('rich results through Symbol.for("Jupyter.display")', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(
        await k.run("({ [Symbol.for('Jupyter.display')]() { return { 'text/plain': 'X', 'text/html': '<b>x</b>', 'application/json': { a: 1 }, 'application/x-custom': 'c' }; } })"),
        [count(1), { type: 'result', text: 'X', html: '<b>x</b>', json: { a: 1 }, extra: { 'application/x-custom': 'c' }, is_main_result: true }, end],
      );
      const msgs = await k.run("({ [Symbol.for('Jupyter.display')]() { return { 'application/json': { n: 1n } }; } })");
      checkError(msgs[1], 'KernelError', 'the result cannot be sent: Do not know how to serialize a BigInt');
      assert.deepEqual(await k.run('1'), [count(3), result('1'), end]);
      await k.close();
    });

    test('process.exit() in a cell: the context restarts empty and stays usable', async () => {
      const k = await Kernel.start(mode);
      assert.deepEqual(await k.run('x = 5'), [count(1), result('5'), end]);
      const msgs = await k.run("console.log('bye'); process.exit(3)");
      assert.deepEqual(msgs.slice(0, 2), [count(2), out('bye\n')]);
      checkError(msgs[2], 'KernelDied', 'The JavaScript process exited (code 3); a fresh one was started, its state is lost');
      assert.deepEqual(msgs[3], end);
      assert.deepEqual(await k.run('typeof x'), [count(3), result('undefined'), end]);
      await k.close();
    });

    test('bad requests are ignored', async () => {
      const k = await Kernel.start(mode);
      k.proc.stdin.write('not json\n\n[1,2]\n{"op":"nope"}\n');
      assert.deepEqual(await k.run('1'), [count(1), result('1'), end]);
      const msgs = await k.run(42);
      assert.deepEqual(msgs[0], count(2));
      checkError(msgs[1], 'ProtocolError');
      await k.close();
    });

    test('EOF or the death of the kernel ends its worker and subprocesses', async () => {
      let k = await Kernel.start(mode);
      let msgs = await k.run("require('child_process').spawn('sleep', ['60']).pid + ',' + process.pid");
      let pids = msgs[1].text.split(',').map(Number);
      assert.ok(pids.every(alive));
      assert.deepEqual(await k.close(), { code: 0, signal: null });
      await waitFor(() => !pids.some(alive), 3000, 'the worker and its subprocess to end');

      k = await Kernel.start(mode);
      msgs = await k.run("require('child_process').spawn('sleep', ['60']).pid + ',' + process.pid");
      pids = msgs[1].text.split(',').map(Number);
      k.proc.kill('SIGKILL');
      await waitFor(() => !pids.some(alive), 3000, 'the worker and its subprocess to end');
    });
  });
}

// TypeScript contexts: the same kernel started with --typescript compiles each cell with the
// compiler scripts/interp-ts.sh installs.
const TS_DIR = (process.env.RINGFENCE_INTERP_TS || '/opt/ringfence/python/share/ringfence/typescript') + '/node_modules/typescript';
describe('kernel started with --typescript', { skip: !existsSync(TS_DIR) && 'SKIPPED: no TypeScript compiler at ' + TS_DIR + ' (scripts/interp-ts.sh)' }, () => {
  test('typed cells run, keep state and stream output', async () => {
    const k = await Kernel.start('ts');
    assert.deepEqual(await k.run('interface P { x: number }\nconst p: P = { x: 2 }\nconsole.log(p.x)'), [count(1), out('2\n'), end]);
    assert.deepEqual(await k.run('const q = <number>p.x * 21; q'), [count(2), result('42'), end]);
    assert.deepEqual(await k.run('enum E { A = 3 }\nE.A as number'), [count(3), result('3'), end]);
    await k.close();
  });

  test('errors carry the TypeScript line numbers', async () => {
    const k = await Kernel.start('ts');
    const msgs = await k.run('type T = string\n\n\nfunction f(x: T): never {\n  throw new RangeError(x)\n}\nf("b")');
    checkError(msgs[1], 'RangeError', 'b');
    assert.match(msgs[1].traceback, /at f \(<cell-1>:5\)/);
    assert.match(msgs[1].traceback, /at <cell-1>:7/);
    const bad = await k.run('let y: = 1');
    checkError(bad[1], 'SyntaxError', 'Type expected.');
    assert.match(bad[1].traceback, /^<cell-2>:1\nlet y: = 1\n {7}\^/);
    assert.deepEqual(await k.run('1 + 1'), [count(3), result('2'), end]);
    await k.close();
  });

  test('a missing compiler is a clear error, not a dead kernel', async () => {
    const k = await Kernel.start('ts', { ...process.env, RINGFENCE_INTERP_TS: '/nonexistent' });
    const msgs = await k.run('1');
    checkError(msgs[1], 'KernelError');
    assert.match(msgs[1].value, /TypeScript compiler is not installed/);
    await k.close();
  });
});
