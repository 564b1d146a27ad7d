'use strict';
// Ringfence JavaScript kernel: the Node side of interp/PROTOCOL.md (stdio transport).
//
// Run as `node ringfence_kernel.js` or as `node -e "<this whole file>"`. Node 18 or later, no
// dependencies. Requests arrive as JSON lines on fd 0, messages leave as JSON lines on fd 1.
//
// Design
// ------
// Plain Node cannot dup2(), so one process cannot move its own fds 0/1/2 away from the channel
// and onto capture pipes. The kernel is therefore two processes:
//
//   supervisor (the process the server started; the `pid` in the ready message)
//     Owns the channel (fd 0 in, fd 1 out) and runs no user code, so nothing the user writes
//     can reach the channel. It numbers executions, turns the worker's raw output into
//     stdout/stderr messages as it is produced, and builds every message the server sees.
//   worker (`node -`, its source fed on stdin, which is then at EOF; own process group)
//     Runs the cells. Its fds 1 and 2 are sockets the supervisor reads, so console.log,
//     process.stdout.write, fs.writeSync(1, ..) and subprocesses with inherited stdio all end
//     up as stdout/stderr messages. fd 3 carries JSON lines between the two; fd 4 carries
//     interrupts and liveness to a watchdog thread inside the worker.
//
// Cells run through the V8 inspector (`Runtime.evaluate` with `replMode: true`, the mode of the
// DevTools console) in the worker's main context, which lives as long as the worker:
// top-level await; top-level let/const/class/function persist between cells and may be
// declared again; the completion value of the cell is the main result. A string result is
// sent as its raw text (E2B strips one level of quotes), anything else as util.inspect().
// Static `import x from 'y'` and `import('y')` are rewritten to a dynamic import helper,
// because code evaluated through the inspector has no module loader hook of its own.
//
// Ordering: at the end of a cell the worker writes a marker to its stdout and stderr and then
// reports the outcome on fd 3; the supervisor sends result/error and end_of_execution only once
// it has read both markers, so everything the cell printed comes first.
//
// Interrupt (`{"op":"interrupt"}`; SIGINT sent to the supervisor does the same):
//   1. The supervisor sends SIGINT to the worker's process group, like Ctrl-C in a terminal:
//      subprocesses the cell waits for (execSync('sleep 100')) get it too. When the worker's
//      event loop is free (the cell awaits something, `await new Promise(() => {})`), its
//      SIGINT handler ends the cell at once; the awaited promise itself stays pending.
//   2. The supervisor also tells the worker's watchdog thread. While the cell has not ended,
//      the watchdog checks a heartbeat that the main thread's event loop bumps every 25 ms;
//      when it stands still for 150 ms, the main thread is stuck in JavaScript
//      (`while(true){}`, at the top of the cell, after an await or in a timer callback) and the
//      watchdog terminates that JavaScript through the inspector (Runtime.terminateExecution,
//      the DevTools "stop" button). The pending SIGINT handler then ends the cell. The worker
//      runs with --no-force-async-hooks-checks so that Node survives a terminated callback.
//   In both cases the cell ends with error `Interrupted` and all state is kept. (vm's
//   breakOnSigint is not used: a SIGINT that lands as a cell's synchronous part ends can stay
//   pending in Node's SIGINT watchdog thread and break the next cell.)
//   3. If the cell still has not ended after RINGFENCE_INTERRUPT_KILL_MS (default 2000 ms),
//      the supervisor kills the worker's process group and starts a fresh worker: the cell
//      ends with error `Interrupted` saying that the state was lost; the context stays usable.
//      This happens when user code has turned async_hooks on (AsyncLocalStorage, ...): Node
//      then aborts on the terminated callback. The server's grace period must be longer
//      (INTERRUPT_GRACE, 3 s, in crates/server/src/interp.rs).
// If the worker dies (process.exit() in a cell, out of memory, ...) the running cell ends with
// error `KernelDied` and a fresh worker (empty state) takes over. If the supervisor dies, the
// watchdog sees fd 4 close and kills the worker's process group.
//
// Limits and known gaps:
// - Output that a cell's leftovers (timers, background processes) write while no cell runs is
//   dropped, as E2B does; written while a later cell runs, it is shown in that cell.
// - stdout and stderr are two sockets: each keeps its order, their interleaving is approximate.
// - An interrupted cell's pending promises and timers are not cancelled; what they print later
//   follows the rule above.
// - The worker's fds 3 and 4 are inherited by subprocesses (Node cannot mark them
//   close-on-exec). They only lead to the supervisor, which validates what it reads.
// - A result's text is cut at 1 MiB; stdout/stderr are sent in pieces of at most 64 Ki chars.
// - Only the stdio transport; there is no socket/zygote mode for JavaScript.
// - Cost per context: two Node processes (about 45 + 55 MB RSS, 15 threads).

function ringfenceKernel(role) {
  'use strict';
  const fs = require('fs');
  const util = require('util');

  // Longest JSON line accepted from the server or from the worker.
  const MAX_LINE_BYTES = 64 * 1024 * 1024;

  if (role === 'worker') runWorker();
  else runSupervisor();

  // ---------------------------------------------------------------------------------------
  // Shared helpers

  // RFC 3339 UTC with microseconds, e.g. 2026-11-27T04:47:21.156464Z.
  function timestamp() {
    const us = Math.floor((performance.timeOrigin + performance.now()) * 1000);
    const iso = new Date(Math.floor(us / 1000)).toISOString();
    return iso.slice(0, 19) + '.' + String(us % 1000000).padStart(6, '0') + 'Z';
  }

  // Returns a 'data' listener that calls onLine(string) for every complete '\n'-terminated
  // line. A line longer than maxBytes is dropped (onOverflow is told) up to its newline.
  function lineSplitter(onLine, maxBytes, onOverflow) {
    let parts = [];
    let size = 0;
    let skipping = false;
    return (chunk) => {
      if (typeof chunk === 'string') chunk = Buffer.from(chunk, 'utf8');
      let start = 0;
      for (;;) {
        const nl = chunk.indexOf(10, start);
        if (nl < 0) break;
        if (!skipping) {
          parts.push(chunk.subarray(start, nl));
          const line = Buffer.concat(parts).toString('utf8');
          parts = [];
          size = 0;
          onLine(line);
        }
        skipping = false;
        start = nl + 1;
      }
      if (start < chunk.length && !skipping) {
        size += chunk.length - start;
        if (size > maxBytes) {
          parts = [];
          size = 0;
          skipping = true;
          if (onOverflow) onOverflow();
        } else {
          parts.push(chunk.subarray(start));
        }
      }
    };
  }

  function hasOwn(obj, key) {
    return Object.prototype.hasOwnProperty.call(obj, key);
  }

  function isPlainObject(v) {
    return v !== null && typeof v === 'object' && !Array.isArray(v);
  }

  // ---------------------------------------------------------------------------------------
  // Supervisor: owns the channel, never runs user code.

  function runSupervisor() {
    const { spawn } = require('child_process');
    const { StringDecoder } = require('string_decoder');
    const crypto = require('crypto');

    const KILL_AFTER_MS = positiveInt(process.env.RINGFENCE_INTERRUPT_KILL_MS, 2000);
    // `node ringfence_kernel.js --typescript [DIR]` (or `node -e <source> -- --typescript [DIR]`):
    // cells are TypeScript, compiled to JavaScript by the worker (see transpileCell) with the
    // compiler in DIR (the server passes where scripts/interp-ts.sh installed it), else in
    // RINGFENCE_INTERP_TS, else in the default interpreter environment's.
    const tsFlag = process.argv.indexOf('--typescript', 1);
    const LANGUAGE = tsFlag > 0 ? 'typescript' : 'javascript';
    const TS_DIR = (tsFlag > 0 && process.argv[tsFlag + 1]) || process.env.RINGFENCE_INTERP_TS || '/opt/ringfence/python/share/ringfence/typescript';
    const TS_PATH = TS_DIR + '/node_modules/typescript';
    // After the worker reported the end of a cell, how long to wait for its end markers
    // while nothing arrives on the output sockets (they never come if the cell closed them).
    const MARKER_WAIT_MS = 1000;
    // Longest text in one stdout/stderr message (characters).
    const MAX_TEXT = 64 * 1024;

    // The end-of-cell marker is `\0rf:<nonce>:<seq>\0`; the nonce keeps ordinary output from
    // looking like one by accident.
    const markerHead = '\u0000rf:' + crypto.randomBytes(8).toString('hex') + ':';

    const baseEnv = Object.assign({}, process.env);
    delete baseEnv.RINGFENCE_INTERRUPT_KILL_MS;
    delete baseEnv.RINGFENCE_INTERP_TS;
    let envEpoch = 0; // bumped by set_env; a worker started earlier gets the new env when ready

    const sleeper = new Int32Array(new SharedArrayBuffer(4));
    let executionCount = 0;
    let seqCounter = 0;
    let worker = null; // the live worker, see startWorker()
    let cell = null; // the running execution
    const queue = []; // executions waiting for the worker
    let announced = false; // ready sent
    let failedStarts = 0; // workers in a row that died before they were ready
    let shuttingDown = false;

    process.stdin.on('data', lineSplitter(onRequestLine, MAX_LINE_BYTES, () => warn('request line too long, dropped')));
    process.stdin.on('end', () => shutdown(0));
    process.stdin.on('error', () => shutdown(0));
    process.on('SIGTERM', () => shutdown(143));
    process.on('SIGHUP', () => shutdown(129));
    process.on('SIGINT', () => {
      if (cell) interrupt(cell.id);
    });
    startWorker();

    function positiveInt(text, fallback) {
      const n = Number(text);
      return Number.isInteger(n) && n > 0 ? n : fallback;
    }

    function warn(text) {
      try {
        fs.writeSync(2, 'ringfence_kernel.js: ' + text + '\n');
      } catch (_) {
        // nowhere to report
      }
    }

    // Blocking write of one message; the channel is fd 1 and nothing else writes to it.
    function send(msg) {
      const buf = Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
      let off = 0;
      while (off < buf.length) {
        try {
          off += fs.writeSync(1, buf, off, buf.length - off);
        } catch (e) {
          if (e.code === 'EAGAIN') {
            Atomics.wait(sleeper, 0, 0, 2);
            continue;
          }
          shutdown(e.code === 'EPIPE' ? 0 : 1);
          return;
        }
      }
    }

    function shutdown(code) {
      if (shuttingDown) return;
      shuttingDown = true;
      if (worker) signalGroup(worker, 'SIGKILL');
      process.exit(code);
    }

    function signalGroup(w, signal) {
      try {
        process.kill(-w.pid, signal);
      } catch (_) {
        try {
          process.kill(w.pid, signal);
        } catch (_) {
          // already gone
        }
      }
    }

    // ----- requests from the server

    function onRequestLine(line) {
      if (!line.trim()) return;
      let req;
      try {
        req = JSON.parse(line);
      } catch (_) {
        warn('request is not JSON, ignored');
        return;
      }
      if (!isPlainObject(req)) return;
      if (req.op === 'execute') {
        if (typeof req.id !== 'string') {
          warn('execute without a string id, ignored');
          return;
        }
        let problem = null;
        if (typeof req.code !== 'string') problem = '"code" must be a string';
        else if (req.env_vars != null && !isPlainObject(req.env_vars)) problem = '"env_vars" must be an object or null';
        queue.push({ id: req.id, code: req.code, env: req.env_vars ? stringValues(req.env_vars) : null, problem });
        pump();
      } else if (req.op === 'interrupt') {
        if (typeof req.id === 'string') interrupt(req.id);
      } else if (req.op === 'set_env') {
        if (!isPlainObject(req.env)) {
          warn('set_env without an object "env", ignored');
          return;
        }
        for (const k of Object.keys(baseEnv)) delete baseEnv[k];
        Object.assign(baseEnv, stringValues(req.env));
        envEpoch++;
        if (worker && worker.ready) {
          worker.envEpoch = envEpoch;
          toWorker(worker, { op: 'set_env', env: baseEnv });
        }
      } else {
        warn('unknown op ' + JSON.stringify(String(req.op)) + ', ignored');
      }
    }

    function stringValues(obj) {
      const out = {};
      for (const k of Object.keys(obj)) {
        if (obj[k] != null) out[k] = String(obj[k]);
      }
      return out;
    }

    // Start the next queued execution if the worker can take it.
    function pump() {
      while (!cell && queue.length && worker && worker.ready) {
        const req = queue.shift();
        executionCount++;
        send({ type: 'number_of_executions', id: req.id, execution_count: executionCount });
        if (req.problem) {
          send({ type: 'error', id: req.id, name: 'ProtocolError', value: req.problem, traceback: 'ProtocolError: ' + req.problem });
          send({ type: 'end_of_execution', id: req.id });
          continue;
        }
        const seq = ++seqCounter;
        cell = {
          id: req.id,
          seq,
          worker,
          outcome: null, // what the worker reported: { result?, error? }
          expect: null, // the streams that will carry an end marker
          seen: { stdout: false, stderr: false }, // end markers read so far
          lastData: Date.now(),
          markerTimer: null,
          killTimer: null,
          interrupted: false,
          killed: false,
        };
        toWorker(worker, {
          op: 'exec',
          seq,
          code: req.code,
          env: req.env,
          marker: markerHead + seq + '\u0000',
          name: '<cell-' + executionCount + '>',
          ts: LANGUAGE === 'typescript' ? TS_PATH : null,
        });
      }
    }

    function interrupt(id) {
      if (cell && cell.id === id) {
        const c = cell;
        if (c.outcome || c.killed) return;
        c.interrupted = true;
        signalGroup(c.worker, 'SIGINT');
        try {
          c.worker.wd.write('interrupt ' + c.seq + '\n');
        } catch (_) {
          // the watchdog is gone; the kill below still works
        }
        if (!c.killTimer) {
          c.killTimer = setTimeout(() => {
            if (cell !== c || c.outcome) return;
            c.killed = true;
            signalGroup(c.worker, 'SIGKILL'); // onWorkerExit ends the cell and restarts
          }, KILL_AFTER_MS);
        }
        return;
      }
      // Not started yet (the worker was restarting): end it without running it.
      const i = queue.findIndex((r) => r.id === id);
      if (i >= 0) {
        const [req] = queue.splice(i, 1);
        executionCount++;
        send({ type: 'number_of_executions', id: req.id, execution_count: executionCount });
        send(Object.assign({ type: 'error', id: req.id }, interruptedError('interrupted before it started')));
        send({ type: 'end_of_execution', id: req.id });
      }
    }

    function interruptedError(detail) {
      const value = 'Execution interrupted' + (detail ? ' (' + detail + ')' : '');
      return { name: 'Interrupted', value, traceback: 'Interrupted: ' + value };
    }

    // ----- the worker process

    function startWorker() {
      const proc = spawn(process.execPath, ['--no-force-async-hooks-checks', '--input-type=commonjs', '-'], {
        stdio: ['pipe', 'pipe', 'pipe', 'pipe', 'pipe'],
        detached: true, // own process group: interrupts and kills reach its subprocesses too
        env: baseEnv,
      });
      const w = {
        proc,
        pid: proc.pid,
        ready: false,
        dead: false,
        envEpoch,
        ctl: proc.stdio[3],
        wd: proc.stdio[4],
        streams: [],
      };
      worker = w;
      proc.on('error', (err) => {
        // spawn failed (no pid) or a signal could not be sent
        if (!w.pid) {
          warn('cannot start the worker: ' + err.message);
          onWorkerExit(w, null, null);
        }
      });
      proc.on('exit', (code, signal) => onWorkerExit(w, code, signal));
      if (!w.pid) return; // the 'error' event follows
      proc.stdin.on('error', () => {});
      proc.stdin.end("'use strict';\n(" + ringfenceKernel.toString() + ")('worker');\n");
      w.ctl.on('data', lineSplitter((line) => onWorkerLine(w, line), MAX_LINE_BYTES, () => warn('worker line too long, dropped')));
      w.ctl.on('error', () => {});
      w.wd.on('error', () => {});
      for (const [name, stream] of [['stdout', proc.stdout], ['stderr', proc.stderr]]) {
        const st = { name, stream, decoder: new StringDecoder('utf8'), held: '', ended: false };
        w.streams.push(st);
        stream.on('data', (chunk) => onOutput(w, st, st.decoder.write(chunk)));
        stream.on('end', () => {
          st.ended = true;
          onOutput(w, st, st.decoder.end());
          if (st.held) {
            const rest = st.held;
            st.held = '';
            emitOutput(w, st, rest);
          }
        });
        stream.on('error', () => {});
      }
    }

    function toWorker(w, msg) {
      try {
        w.ctl.write(JSON.stringify(msg) + '\n');
      } catch (_) {
        // it died; onWorkerExit deals with it
      }
    }

    function onWorkerLine(w, line) {
      if (w !== worker || !line.trim()) return;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch (_) {
        return; // only user code writing to fd 3 on purpose gets here
      }
      if (!isPlainObject(msg)) return;
      if (msg.t === 'ready' && !w.ready) {
        w.ready = true;
        failedStarts = 0;
        if (w.envEpoch !== envEpoch) {
          w.envEpoch = envEpoch;
          toWorker(w, { op: 'set_env', env: baseEnv });
        }
        if (!announced) {
          announced = true;
          send({ type: 'ready', language: LANGUAGE, pid: process.pid });
        }
        pump();
      } else if (msg.t === 'done' && cell && cell.worker === w && msg.seq === cell.seq && !cell.outcome) {
        cell.outcome = checkOutcome(msg);
        const m = isPlainObject(msg.markers) ? msg.markers : {};
        cell.expect = { stdout: m.stdout === true, stderr: m.stderr === true };
        cell.lastData = Date.now();
        maybeFinish();
      }
    }

    // The worker is not trusted to be well-formed: keep only fields of the right types.
    function checkOutcome(msg) {
      const out = {};
      if (isPlainObject(msg.error)) {
        const e = msg.error;
        out.error = { name: String(e.name ?? 'Error'), value: String(e.value ?? ''), traceback: String(e.traceback ?? '') };
      } else if (isPlainObject(msg.result)) {
        const r = {};
        for (const k of ['text', 'html', 'markdown', 'svg', 'png', 'jpeg', 'pdf', 'latex', 'javascript']) {
          if (typeof msg.result[k] === 'string') r[k] = msg.result[k];
        }
        for (const k of ['json', 'data', 'chart', 'extra']) {
          if (isPlainObject(msg.result[k])) r[k] = msg.result[k];
        }
        r.is_main_result = true;
        out.result = r;
      }
      return out;
    }

    // Raw output of the worker, already decoded. Splits it at end markers and streams it.
    function onOutput(w, st, text) {
      text = st.held + text;
      st.held = '';
      if (cell && cell.worker === w) cell.lastData = Date.now();
      let from = 0;
      for (;;) {
        const i = text.indexOf(markerHead, from);
        if (i < 0) break;
        const m = /^(\d{1,15})\u0000/.exec(text.slice(i + markerHead.length, i + markerHead.length + 16));
        if (!m) {
          if (/^\d{0,15}$/.test(text.slice(i + markerHead.length))) break; // incomplete: held below
          from = i + 1; // not a marker after all
          continue;
        }
        emitOutput(w, st, text.slice(0, i));
        text = text.slice(i + markerHead.length + m[0].length);
        from = 0;
        if (cell && cell.worker === w && Number(m[1]) === cell.seq) {
          cell.seen[st.name] = true;
          // What follows the marker in this read was written before the next cell started
          // (maybeFinish may start it right now): it belongs to no cell.
          const next = text.indexOf(markerHead);
          text = next < 0 ? '' : text.slice(next);
          maybeFinish();
        }
      }
      // Hold back a tail that may be the start of a marker split across reads.
      const k = text.lastIndexOf('\u0000');
      if (k >= 0 && text.length - k < markerHead.length + 16) {
        const tail = text.slice(k);
        if (markerHead.startsWith(tail) || (tail.startsWith(markerHead) && /^\d*$/.test(tail.slice(markerHead.length)))) {
          st.held = tail;
          text = text.slice(0, k);
        }
      }
      emitOutput(w, st, text);
    }

    function emitOutput(w, st, text) {
      if (!text || !cell || cell.worker !== w || cell.seen[st.name]) return; // idle: dropped
      for (let i = 0; i < text.length; i += MAX_TEXT) {
        let end = Math.min(text.length, i + MAX_TEXT);
        // do not split a surrogate pair
        if (end < text.length && /[\ud800-\udbff]/.test(text[end - 1])) end--;
        send({ type: st.name, id: cell.id, text: text.slice(i, end), timestamp: timestamp() });
        i = end - MAX_TEXT;
      }
    }

    // End the running cell once the worker reported its outcome and both markers were read.
    function maybeFinish() {
      const c = cell;
      if (!c || !c.outcome) return;
      const waiting = ['stdout', 'stderr'].some((n) => c.expect[n] && !c.seen[n]);
      if (waiting) {
        const idle = Date.now() - c.lastData;
        if (idle < MARKER_WAIT_MS) {
          clearTimeout(c.markerTimer);
          c.markerTimer = setTimeout(maybeFinishAnyway, MARKER_WAIT_MS - idle + 5);
          return;
        }
      }
      clearTimeout(c.markerTimer);
      clearTimeout(c.killTimer);
      cell = null;
      // An interrupted cell reports the interrupt even if its code went on to a normal end
      // (a catch around a subprocess that got the SIGINT, say).
      if (c.interrupted && !c.outcome.error) c.outcome.error = interruptedError();
      if (c.outcome.result) send(Object.assign({ type: 'result', id: c.id }, c.outcome.result));
      if (c.outcome.error) send(Object.assign({ type: 'error', id: c.id }, c.outcome.error));
      send({ type: 'end_of_execution', id: c.id });
      pump();
    }

    function maybeFinishAnyway() {
      const c = cell;
      if (!c || !c.outcome) return;
      if (Date.now() - c.lastData >= MARKER_WAIT_MS) c.expect = {};
      maybeFinish();
    }

    function onWorkerExit(w, code, signal) {
      if (w.dead) return;
      w.dead = true;
      if (w !== worker) return;
      worker = null;
      const wasReady = w.ready;
      // Let the output sockets drain; a background subprocess may keep them open, so not long.
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        for (const st of w.streams) {
          if (st.held) emitOutput(w, st, st.held);
          st.held = '';
          st.stream.destroy();
        }
        signalGroup(w, 'SIGKILL'); // what is left of its process group
        const c = cell && cell.worker === w ? cell : null;
        if (c) {
          if (!c.outcome) {
            c.outcome = {
              error: c.interrupted
                ? interruptedError('the JavaScript process did not survive the interrupt; a fresh one was started, its state is lost')
                : diedError(code, signal),
            };
          }
          c.expect = {};
          maybeFinish();
        }
        if (shuttingDown) return;
        if (!wasReady) failedStarts++;
        if (failedStarts >= 2 || (!announced && !wasReady)) {
          warn('the worker process exited before it was ready (code ' + code + ', signal ' + signal + ')');
          for (const req of queue.splice(0)) {
            executionCount++;
            send({ type: 'number_of_executions', id: req.id, execution_count: executionCount });
            send(Object.assign({ type: 'error', id: req.id }, diedError(code, signal)));
            send({ type: 'end_of_execution', id: req.id });
          }
          shutdown(1);
          return;
        }
        startWorker();
      };
      if (w.streams.every((st) => st.ended)) finish();
      else {
        const t = setTimeout(finish, 300);
        for (const st of w.streams) {
          st.stream.once('end', () => {
            if (w.streams.every((s) => s.ended)) {
              clearTimeout(t);
              finish();
            }
          });
        }
      }
    }

    function diedError(code, signal) {
      const how = signal ? 'signal ' + signal : 'code ' + code;
      const value = 'The JavaScript process exited (' + how + '); a fresh one was started, its state is lost';
      return { name: 'KernelDied', value, traceback: 'KernelDied: ' + value };
    }
  }

  // ---------------------------------------------------------------------------------------
  // Worker: runs the cells. fd 1/2: output sockets, fd 3: control, fd 4: watchdog.

  function runWorker() {
    const net = require('net');
    const inspector = require('inspector');
    const { Worker } = require('worker_threads');

    // Keep our own references: user code may replace these globals.
    const jsonStringify = JSON.stringify;
    const jsonParse = JSON.parse;
    const inspect = util.inspect;
    const isNativeError = util.types.isNativeError;
    const outStream = process.stdout;
    const errStream = process.stderr;
    const outWrite = outStream.write;
    const errWrite = errStream.write;

    const GROUP = 'ringfence-cell';
    const SLOT = Symbol.for('ringfence.kernel.slot');
    const MAX_RESULT_TEXT = 1024 * 1024;
    const HEARTBEAT_MS = 25; // see watchdogMain

    // `child_process.fork()` in user code reuses process.execArgv; ours would not help it.
    process.execArgv.length = 0;

    // Dynamic import for cells (see rewriteImports). This function is compiled as part of the
    // [stdin] script, which Node gives a module loader hook; specifiers resolve from the cwd.
    Object.defineProperty(globalThis, '__ringfence_import', {
      value: (specifier) => import(specifier),
      writable: true,
      configurable: true,
      enumerable: false,
    });

    // shared[0]: seq of the running cell (0: none); shared[1]: heartbeat while a cell runs.
    const shared = new Int32Array(new SharedArrayBuffer(8));
    let heartbeat = null;
    try {
      const wd = new Worker('(' + watchdogMain.toString() + ')()', {
        eval: true,
        workerData: { shared: shared.buffer },
        stdout: true,
        stderr: true,
      });
      wd.on('error', () => {}); // a failed watchdog must not take the worker down
      wd.unref();
    } catch (_) {
      // without a watchdog, a cell stuck in JavaScript is left to the supervisor's kill
    }

    const session = new inspector.Session();
    session.connect();
    // A session still connected at exit makes Node print "Waiting for the debugger to
    // disconnect..." into the cell's stderr.
    process.on('exit', () => session.disconnect());

    let current = null; // { seq, marker, name, code, savedEnv, finished }
    let pendingEnv = null; // set_env received during a cell

    process.on('SIGINT', () => {
      if (current) finishCell(current.seq, { error: interruptedError() });
    });
    process.on('uncaughtException', (err) => background('Uncaught', err));
    process.on('unhandledRejection', (reason) => background('Unhandled promise rejection:', reason));

    // Each control line is handled in its own macrotask: if an interrupt terminates the
    // JavaScript running in one, the lines after it are still handled.
    const ctl = new net.Socket({ fd: 3, readable: true, writable: true });
    const pendingLines = [];
    ctl.on('data', lineSplitter((line) => {
      pendingLines.push(line);
      if (pendingLines.length === 1) setImmediate(nextControlLine);
    }, MAX_LINE_BYTES));
    // The supervisor is gone: so is everything of this context, subprocesses included.
    const die = () => {
      try {
        process.kill(-process.pid, 'SIGKILL');
      } finally {
        process.kill(process.pid, 'SIGKILL');
      }
    };
    ctl.on('end', die);
    ctl.on('error', die);
    ctlSend({ t: 'ready', pid: process.pid });

    function ctlSend(msg) {
      let line;
      try {
        line = jsonStringify(msg);
      } catch (e) {
        // not JSON (a BigInt in a display bundle, say): report that instead
        const value = 'the result cannot be sent: ' + e.message;
        line = jsonStringify(Object.assign({}, msg, { result: undefined, error: { name: 'KernelError', value, traceback: 'KernelError: ' + value } }));
      }
      ctl.write(line + '\n');
    }

    function nextControlLine() {
      const line = pendingLines.shift();
      if (pendingLines.length) setImmediate(nextControlLine);
      if (line !== undefined) onControl(line);
    }

    function onControl(line) {
      let msg;
      try {
        msg = jsonParse(line);
      } catch (_) {
        return;
      }
      if (!isPlainObject(msg)) return;
      if (msg.op === 'exec') runCell(msg);
      else if (msg.op === 'set_env') {
        if (current) pendingEnv = msg.env;
        else replaceEnv(msg.env);
      }
    }

    // An error thrown or a promise rejected outside any cell's own flow: shown on stderr (in
    // the running cell, if there is one) instead of ending the process.
    function background(prefix, err) {
      let text;
      try {
        text = err && typeof err.stack === 'string' ? cleanStack(err.stack) : inspect(err);
      } catch (_) {
        text = '<uninspectable value>';
      }
      try {
        errWrite.call(errStream, prefix + ' ' + text + '\n');
      } catch (_) {
        // stderr is gone
      }
    }

    function runCell(msg) {
      const seq = msg.seq;
      current = {
        seq,
        marker: String(msg.marker),
        name: String(msg.name || '<cell>'),
        code: String(msg.code),
        savedEnv: applyEnv(msg.env),
        finished: false,
      };
      Atomics.store(shared, 0, seq);
      heartbeat = setInterval(() => Atomics.add(shared, 1, 1), HEARTBEAT_MS);
      let code = current.code;
      if (typeof msg.ts === 'string') {
        let compiled;
        try {
          compiled = transpileCell(msg.ts, code, current.name);
        } catch (e) {
          finishCell(seq, { error: e && e.tsError ? e.tsError : formatThrown(e, null, null) });
          return;
        }
        code = compiled.js;
        current.code = code; // what ran, for the pointer under a JavaScript syntax error
        current.lineMap = compiled.lineMap;
      }
      const params = {
        expression: rewriteImports(code) + '\n//# sourceURL=' + current.name,
        replMode: true,
        objectGroup: GROUP,
      };
      // Runs the cell's synchronous part now; the callback comes once its promise settles.
      session.post('Runtime.evaluate', params, (err, res) => onEvaluated(seq, err, res));
    }

    function onEvaluated(seq, err, res) {
      const c = current;
      if (!c || c.seq !== seq || c.finished) {
        releaseObjects();
        return;
      }
      let outcome;
      try {
        if (err && /terminated/i.test(String(err.message))) {
          // the watchdog stopped the cell's synchronous part (see watchdogMain)
          outcome = { error: interruptedError() };
        } else if (err) {
          outcome = { error: { name: 'KernelError', value: String(err.message), traceback: String(err.stack) } };
        } else if (res.exceptionDetails) {
          const d = res.exceptionDetails;
          const thrown = d.exception ? remoteValue(d.exception) : d.text;
          outcome = { error: formatThrown(thrown, d, c) };
        } else {
          const value = remoteValue(res.result);
          outcome = value === undefined ? {} : { result: formatResult(value) };
        }
      } catch (e) {
        outcome = { error: formatThrown(e, null, null) };
      }
      if (outcome.error && c.lineMap) outcome.error = mapLines(outcome.error, c.name, c.lineMap);
      releaseObjects();
      finishCell(seq, outcome);
    }

    // Ends a cell exactly once, whoever gets there first (the evaluation, the SIGINT handler).
    function finishCell(seq, outcome) {
      const c = current;
      if (!c || c.seq !== seq || c.finished) return;
      c.finished = true;
      current = null;
      clearInterval(heartbeat);
      Atomics.store(shared, 0, 0);
      restoreEnv(c.savedEnv);
      if (pendingEnv) {
        replaceEnv(pendingEnv);
        pendingEnv = null;
      }
      const markers = { stdout: writeMarker(outStream, outWrite, c.marker), stderr: writeMarker(errStream, errWrite, c.marker) };
      ctlSend(Object.assign({ t: 'done', seq, markers }, outcome));
    }

    function writeMarker(stream, write, marker) {
      if (!stream.writable || stream.destroyed) return false;
      try {
        write.call(stream, marker);
        return true;
      } catch (_) {
        return false;
      }
    }

    function releaseObjects() {
      session.post('Runtime.releaseObjectGroup', { objectGroup: GROUP }, () => {});
    }

    // The real value behind an inspector RemoteObject. Same-thread inspector calls without
    // awaitPromise answer synchronously, so the value is in the slot when post() returns.
    function remoteValue(ro) {
      if (!ro) return undefined;
      if (ro.objectId) {
        let failure = null;
        session.post(
          'Runtime.callFunctionOn',
          {
            objectId: ro.objectId,
            functionDeclaration: "function () { 'use strict'; globalThis[Symbol.for('ringfence.kernel.slot')] = this; }",
            objectGroup: GROUP,
          },
          (err) => {
            if (err) failure = err;
          },
        );
        const value = globalThis[SLOT];
        delete globalThis[SLOT];
        if (failure) throw failure;
        return value;
      }
      if (hasOwn(ro, 'unserializableValue')) {
        const u = ro.unserializableValue;
        if (ro.type === 'bigint') return BigInt(u.slice(0, -1));
        return u === '-0' ? -0 : Number(u);
      }
      return ro.type === 'undefined' ? undefined : ro.value;
    }

    function safeInspect(v) {
      try {
        return inspect(v);
      } catch (e) {
        return '<uninspectable value: ' + (e && e.message) + '>';
      }
    }

    function capText(text) {
      return text.length > MAX_RESULT_TEXT
        ? text.slice(0, MAX_RESULT_TEXT) + '\n... [' + (text.length - MAX_RESULT_TEXT) + ' more characters not shown]'
        : text;
    }

    // MIME bundle keys (Jupyter) → result fields (E2B).
    const MIME_FIELDS = {
      'text/plain': 'text',
      'text/html': 'html',
      'text/markdown': 'markdown',
      'image/svg+xml': 'svg',
      'image/png': 'png',
      'image/jpeg': 'jpeg',
      'application/pdf': 'pdf',
      'text/latex': 'latex',
      'application/json': 'json',
      'application/javascript': 'javascript',
      'e2b/data': 'data',
      'e2b/chart': 'chart',
    };
    const OBJECT_FIELDS = new Set(['json', 'data', 'chart']);

    function formatResult(value) {
      const r = {};
      // Rich output, as Deno's Jupyter kernel does it: obj[Symbol.for('Jupyter.display')]()
      // returns a MIME bundle such as { 'text/html': '<b>hi</b>' }.
      try {
        const fn = value !== null && (typeof value === 'object' || typeof value === 'function')
          ? value[Symbol.for('Jupyter.display')]
          : undefined;
        const bundle = typeof fn === 'function' ? fn.call(value) : undefined;
        if (isPlainObject(bundle)) {
          for (const mime of Object.keys(bundle)) {
            const v = bundle[mime];
            const field = MIME_FIELDS[mime];
            if (!field) {
              r.extra = r.extra || {};
              r.extra[mime] = v;
            } else if (OBJECT_FIELDS.has(field) ? isPlainObject(v) : typeof v === 'string') {
              r[field] = v;
            }
          }
        }
      } catch (e) {
        background('Jupyter.display failed:', e);
      }
      if (r.text === undefined) r.text = typeof value === 'string' ? value : safeInspect(value);
      r.text = capText(r.text);
      r.is_main_result = true;
      return r;
    }

    function formatThrown(v, details, cell) {
      if (isNativeError(v) || v instanceof Error) {
        let name = 'Error';
        let message = '';
        let stack = '';
        try {
          name = String(v.name || (v.constructor && v.constructor.name) || 'Error');
          message = String(v.message ?? '');
          stack = typeof v.stack === 'string' ? cleanStack(v.stack) : name + ': ' + message;
        } catch (_) {
          // getters that throw: keep what we have
        }
        // A syntax error of the cell itself has no frame in the cell; point at the source.
        if (name === 'SyntaxError' && cell && details && !/\n\s+at /.test(stack) && typeof details.lineNumber === 'number') {
          const lines = cell.code.split('\n');
          let row = details.lineNumber;
          let col = details.columnNumber || 0;
          if (row >= lines.length) {
            // past the end of the cell (unexpected end of input): point after its last line
            row = lines.length - 1;
            col = lines[row].length;
          }
          col = Math.max(0, Math.min(col, lines[row].length));
          stack = cell.name + ':' + (row + 1) + '\n' + lines[row] + '\n' + ' '.repeat(col) + '^\n\n' + stack;
        }
        return { name, value: message, traceback: stack || name + ': ' + message };
      }
      const shown = typeof v === 'string' ? v : safeInspect(v);
      return { name: 'Error', value: shown, traceback: 'Uncaught ' + safeInspect(v) };
    }

    // Drop the kernel's own frames (the inspector call and everything below it).
    function cleanStack(stack) {
      const lines = stack.split('\n');
      const cut = lines.findIndex((l, i) => i > 0 && /^\s+at .*(node:inspector|\[stdin\])/.test(l));
      return (cut > 0 ? lines.slice(0, cut) : lines).join('\n');
    }

    // TypeScript: the compiler is loaded on the first cell (about a third of a second), not
    // at start, so JavaScript contexts and TypeScript contexts that are never used pay nothing.
    // Cells are transpiled one at a time (`transpileModule`: syntax only, no type checking,
    // as a REPL cannot see earlier cells' types) to ES2022 with imports kept for
    // rewriteImports; a syntax error is reported against the TypeScript source. A source map
    // gives, for each line of the JavaScript, the TypeScript line it came from, so that stack
    // traces point into the code the user wrote.
    let tsCompiler = null;
    function transpileCell(tsPath, source, name) {
      if (!tsCompiler) {
        try {
          tsCompiler = require(tsPath);
        } catch (e) {
          const value = 'the TypeScript compiler is not installed (' + tsPath + '): ' + e.message;
          throw { tsError: { name: 'KernelError', value, traceback: 'KernelError: ' + value } };
        }
      }
      const ts = tsCompiler;
      const out = ts.transpileModule(source, {
        fileName: name + '.ts',
        reportDiagnostics: true,
        compilerOptions: {
          target: ts.ScriptTarget.ES2022,
          module: ts.ModuleKind.ESNext,
          sourceMap: true,
          removeComments: false,
          esModuleInterop: true,
        },
      });
      const bad = (out.diagnostics || []).find((d) => d.category === ts.DiagnosticCategory.Error);
      if (bad) {
        const value = ts.flattenDiagnosticMessageText(bad.messageText, '\n');
        let where = '';
        if (bad.file && typeof bad.start === 'number') {
          const pos = bad.file.getLineAndCharacterOfPosition(bad.start);
          const line = source.split('\n')[pos.line] || '';
          where = name + ':' + (pos.line + 1) + '\n' + line + '\n' + ' '.repeat(pos.character) + '^\n\n';
        }
        throw { tsError: { name: 'SyntaxError', value, traceback: where + 'SyntaxError: ' + value + ' (TS' + bad.code + ')' } };
      }
      const js = out.outputText.replace(/\n?\/\/# sourceMappingURL=\S*\s*$/, '\n');
      return { js, lineMap: sourceLines(out.sourceMapText) };
    }

    // For each generated line, the source line of its first mapping (0-based), from a source
    // map's base64 VLQ `mappings`.
    function sourceLines(mapText) {
      const map = [];
      let mappings;
      try {
        mappings = jsonParse(mapText).mappings;
      } catch (_) {
        return map;
      }
      const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
      let srcLine = 0;
      for (const line of String(mappings).split(';')) {
        let first = null;
        for (const seg of line.split(',')) {
          if (!seg) continue;
          const fields = [];
          let value = 0;
          let shift = 0;
          for (const ch of seg) {
            const digit = B64.indexOf(ch);
            if (digit < 0) return map;
            value += (digit & 31) << shift;
            if (digit & 32) {
              shift += 5;
            } else {
              fields.push(value & 1 ? -(value >>> 1) : value >>> 1);
              value = 0;
              shift = 0;
            }
          }
          if (fields.length >= 4) {
            srcLine += fields[2];
            if (first === null) first = srcLine;
          }
        }
        map.push(first);
      }
      return map;
    }

    // `<cell-N>:LINE[:COL]` in an error's traceback, from JavaScript lines to TypeScript ones
    // (the column is dropped: it counts in the JavaScript).
    function mapLines(error, name, lineMap) {
      const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      const re = new RegExp(escaped + ':(\\d+)(?::\\d+)?', 'g');
      const fix = (text) => String(text).replace(re, (whole, line) => {
        const src = lineMap[Number(line) - 1];
        return typeof src === 'number' ? name + ':' + (src + 1) : whole;
      });
      return Object.assign({}, error, { traceback: fix(error.traceback) });
    }

    function interruptedError() {
      return { name: 'Interrupted', value: 'Execution interrupted', traceback: 'Interrupted: Execution interrupted' };
    }

    // Per-cell environment variables; returns what restoreEnv needs.
    function applyEnv(vars) {
      const saved = [];
      if (!isPlainObject(vars)) return saved;
      for (const k of Object.keys(vars)) {
        try {
          saved.push([k, hasOwn(process.env, k) ? process.env[k] : undefined]);
          process.env[k] = String(vars[k]);
        } catch (_) {
          // a name the OS does not accept
        }
      }
      return saved;
    }

    function restoreEnv(saved) {
      for (let i = saved.length - 1; i >= 0; i--) {
        const [k, v] = saved[i];
        try {
          if (v === undefined) delete process.env[k];
          else process.env[k] = v;
        } catch (_) {
          // same
        }
      }
    }

    function replaceEnv(env) {
      if (!isPlainObject(env)) return;
      for (const k of Object.keys(process.env)) {
        if (!hasOwn(env, k)) delete process.env[k];
      }
      for (const k of Object.keys(env)) {
        try {
          process.env[k] = String(env[k]);
        } catch (_) {
          // same
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Import rewriting. Code run through the inspector cannot use `import`, so:
  //   import('x')                  → __ringfence_import('x')
  //   import X, { a, b as c } from 'x' → const { default: X, a, b: c } = await __ringfence_import('x');
  //   import * as ns from 'x'      → const ns = await __ringfence_import('x');
  //   import 'x'                   → await __ringfence_import('x');
  // A small scanner skips strings, comments, template literals and regular expressions; static
  // imports are only rewritten at the top level of the cell. Line breaks are kept, so line
  // numbers in stack traces stay right.

  function rewriteImports(src) {
    if (!/\bimport\b/.test(src)) return src;
    const STATIC = /import\s*(?:([A-Za-z_$][\w$]*)\s*(?:,\s*)?)?(?:\*\s*as\s+([A-Za-z_$][\w$]*)\s*|\{([^}]*)\}\s*)?from\s*(['"])([^'"\r\n]+)\4[ \t]*;?/y;
    const BARE = /import\s*(['"])([^'"\r\n]+)\1[ \t]*;?/y;
    const REGEX_AFTER_WORD = new Set(['return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void', 'throw', 'case', 'do', 'else', 'yield', 'await']);
    const n = src.length;
    let out = '';
    let copied = 0; // src[0..copied) is in out
    const stack = []; // open brackets; '`' marks a ${ } inside a template literal
    let prev = ''; // previous significant character ('a' for a word or a literal)
    let prevWord = '';
    let newline = true; // a line break since the previous significant token
    let i = 0;

    const replace = (start, end, text) => {
      out += src.slice(copied, start) + text;
      copied = end;
    };
    // Scan template text from j (just after ` or }); returns the index after the closing `
    // or after `${` (then pushes the marker).
    const template = (j) => {
      while (j < n) {
        const c = src[j];
        if (c === '\\') j += 2;
        else if (c === '`') return j + 1;
        else if (c === '$' && src[j + 1] === '{') {
          stack.push('`');
          return j + 2;
        } else j++;
      }
      return n;
    };

    while (i < n) {
      const c = src[i];
      if (c === '\n' || c === '\u2028' || c === '\u2029') {
        newline = true;
        i++;
      } else if (c === ' ' || c === '\t' || c === '\r' || c === '\f' || c === '\v' || c === '\ufeff' || c === '\u00a0') {
        i++;
      } else if (c === '/' && src[i + 1] === '/') {
        while (i < n && src[i] !== '\n') i++;
      } else if (c === '/' && src[i + 1] === '*') {
        const end = src.indexOf('*/', i + 2);
        const stop = end < 0 ? n : end + 2;
        if (src.slice(i, stop).includes('\n')) newline = true;
        i = stop;
      } else if (c === '"' || c === "'") {
        i++;
        while (i < n && src[i] !== c && src[i] !== '\n') i += src[i] === '\\' ? 2 : 1;
        i++;
        prev = 'a';
        newline = false;
      } else if (c === '`') {
        i = template(i + 1);
        prev = 'a';
        newline = false;
      } else if (c === '/' && (prev === '' || '(,=:[!&|?{};+-*%<>~^'.includes(prev) || (prev === 'a' && REGEX_AFTER_WORD.has(prevWord)))) {
        // regular expression literal
        i++;
        let inClass = false;
        while (i < n && src[i] !== '\n') {
          const d = src[i];
          if (d === '\\') i++;
          else if (d === '[') inClass = true;
          else if (d === ']') inClass = false;
          else if (d === '/' && !inClass) break;
          i++;
        }
        i++;
        while (i < n && /[\w$]/.test(src[i])) i++;
        prev = 'a';
        prevWord = '';
        newline = false;
      } else if (/[\p{ID_Start}$_\\]/u.test(c) || /[0-9]/.test(c)) {
        const start = i;
        while (i < n && /[\p{ID_Continue}$\u200c\u200d\\]/u.test(src[i])) i++;
        if (i === start) i++;
        const word = src.slice(start, i);
        const afterDot = prev === '.' && src.slice(Math.max(0, start - 3), start) !== '...';
        if (word === 'import' && !afterDot) {
          let j = i;
          while (j < n && /\s/.test(src[j])) j++;
          if (src[j] === '(') {
            // import(...), unless it is a method named `import`: `import(a) { ... }`
            let depth = 0;
            let k = j;
            for (; k < n; k++) {
              const d = src[k];
              if (d === '(') depth++;
              else if (d === ')' && --depth === 0) break;
              else if (d === '"' || d === "'" || d === '`') {
                for (k++; k < n && src[k] !== d; k++) if (src[k] === '\\') k++;
              }
            }
            k++;
            while (k < n && /\s/.test(src[k])) k++;
            if (src[k] !== '{') replace(start, i, '__ringfence_import');
          } else if (stack.length === 0 && (prev === '' || prev === ';' || prev === '}' || newline)) {
            STATIC.lastIndex = start;
            BARE.lastIndex = start;
            let m = STATIC.exec(src);
            if (m) {
              const [text, def, ns, named, q, spec] = m;
              const from = '__ringfence_import(' + q + spec + q + ')';
              const fields = [];
              if (def) fields.push('default: ' + def);
              if (named !== undefined) {
                for (const item of named.split(',')) {
                  const t = item.trim();
                  if (!t) continue;
                  const as = /^(\S+)\s+as\s+(\S+)$/.exec(t);
                  fields.push(as ? as[1] + ': ' + as[2] : t);
                }
              }
              let decl;
              if (ns) decl = 'const ' + ns + ' = await ' + from + (def ? ', { default: ' + def + ' } = ' + ns : '');
              else if (fields.length) decl = 'const { ' + fields.join(', ') + ' } = await ' + from;
              else decl = 'await ' + from;
              replace(start, start + text.length, decl + ';' + '\n'.repeat(text.split('\n').length - 1));
              i = start + text.length;
              prev = ';';
              newline = false;
              continue;
            } else if ((m = BARE.exec(src))) {
              const text = m[0];
              replace(start, start + text.length, 'await __ringfence_import(' + m[1] + m[2] + m[1] + ');');
              i = start + text.length;
              prev = ';';
              newline = false;
              continue;
            }
          }
        }
        prev = 'a';
        prevWord = word;
        newline = false;
      } else {
        if (c === '(' || c === '[' || c === '{') stack.push(c);
        else if (c === ')' || c === ']') stack.pop();
        else if (c === '}') {
          if (stack.pop() === '`') {
            i = template(i + 1);
            prev = 'a';
            newline = false;
            continue;
          }
        }
        prev = c;
        newline = false;
        i++;
      }
    }
    return copied === 0 ? src : out + src.slice(copied);
  }

  // ---------------------------------------------------------------------------------------
  // Watchdog thread of the worker (its source is passed to `new Worker`, so it must not use
  // anything outside itself). Reads fd 4: `interrupt <seq>` lines from the supervisor; EOF
  // means the supervisor is gone, and then the whole process group is killed.

  function watchdogMain() {
    'use strict';
    const { workerData } = require('worker_threads');
    const net = require('net');
    const shared = new Int32Array(workerData.shared);

    const die = () => {
      try {
        process.kill(-process.pid, 'SIGKILL');
      } finally {
        process.kill(process.pid, 'SIGKILL');
      }
    };
    const sock = new net.Socket({ fd: 4, readable: true, writable: false });
    sock.setEncoding('utf8');
    let buf = '';
    sock.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const m = /^interrupt (\d+)$/.exec(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (m) watch(Number(m[1]));
      }
      if (buf.length > 4096) buf = '';
    });
    sock.on('end', die);
    sock.on('error', die);

    // The supervisor has just sent SIGINT. If the cell keeps running while the main thread's
    // heartbeat stands still, the main thread is stuck in JavaScript that the SIGINT handler
    // cannot reach: terminate it; the pending SIGINT handler then ends the cell.
    // The inspector is loaded and connected only meanwhile: otherwise Node prints "Waiting for
    // the debugger to disconnect..." into the cell's stderr when user code calls process.exit().
    let session = null;
    let watching = 0;
    function watch(seq) {
      if (watching === seq) return;
      watching = seq;
      let beat = Atomics.load(shared, 1);
      let tries = 0;
      const tick = () => {
        if (watching !== seq) return;
        if (Atomics.load(shared, 0) !== seq) {
          watching = 0;
          if (session) session.disconnect();
          session = null;
          return;
        }
        const now = Atomics.load(shared, 1);
        if (now === beat && tries < 40) {
          tries++;
          try {
            if (!session) {
              session = new (require('inspector').Session)();
              session.connectToMainThread();
            }
            session.post('Runtime.terminateExecution', () => {});
          } catch (_) {
            session = null; // no inspector in this Node build: left to the supervisor's kill
          }
        }
        beat = now;
        setTimeout(tick, 150);
      };
      setTimeout(tick, 150);
    }
  }
}

ringfenceKernel('supervisor');
