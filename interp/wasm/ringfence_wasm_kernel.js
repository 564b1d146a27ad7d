// The JavaScript half of the wasm tier's JavaScript: runs as the first turn of every QuickJS
// instance (interp/wasm/ringfence_qjs.c), then the host calls it once per request, each call
// one turn (crates/wasm/src/agent.rs):
//
// - `__ringfence.handle(line)`: one interp/PROTOCOL.md request of the code interpreter's
//   kernel. Cells are global scripts, so `let`, `const`, `function` and `var` at a cell's top
//   level stay defined for the next cell, as in Node's REPL; the completion value is the main
//   result (a string as its raw text, anything else inspected as Node's util.inspect would show
//   it, in short); an uncaught exception is the cell's error. A cell that uses `await` at its
//   top level runs as an async script. `end_of_execution` comes from the host after the turn.
// - `__ringfence.main(argsJson)`: `node -e CODE` / `node FILE [ARGS]`, as a command.
//
// While a cell runs, console output becomes `stdout`/`stderr` messages (line-buffered), so
// nothing a cell prints can forge a protocol line; the host validates each line anyway.
// Timers (`setTimeout`, `setInterval`) fire after the cell's own code, in order of due time,
// waiting as they would in Node; the cell (or command) ends when none is left.
(function () {
  'use strict';
  const rf = globalThis.__rf;
  delete globalThis.__rf;

  // ---- output ---------------------------------------------------------------------------
  // When set (during a cell): [, stdoutWriter, stderrWriter].
  let sinks = null;
  function out(fd, text) {
    if (sinks) sinks[fd].write(text);
    else rf.write(fd, text);
  }

  // ---- inspect: Node's util.inspect, in short ------------------------------------------
  const IDENT = /^[A-Za-z_$][\w$]*$/;
  function quote(s) {
    return "'" + s.replace(/\\/g, '\\\\').replace(/'/g, "\\'").replace(/\n/g, '\\n') + "'";
  }
  function key(k) {
    return typeof k === 'symbol' ? '[' + k.toString() + ']' : IDENT.test(k) ? k : quote(k);
  }
  function inspect(v, depth, seen) {
    if (depth === undefined) depth = 2;
    seen = seen || [];
    switch (typeof v) {
      case 'string':
        return seen.length ? quote(v) : v;
      case 'number':
        return Object.is(v, -0) ? '-0' : String(v);
      case 'bigint':
        return v + 'n';
      case 'undefined':
        return 'undefined';
      case 'boolean':
        return String(v);
      case 'symbol':
        return v.toString();
      case 'function': {
        const n = v.name ? ': ' + v.name : ' (anonymous)';
        return /^class\s/.test(Function.prototype.toString.call(v)) ? '[class' + (v.name ? ' ' + v.name : '') + ']' : '[Function' + n + ']';
      }
    }
    if (v === null) return 'null';
    if (seen.includes(v)) return '[Circular *1]';
    if (v instanceof Error) return v.stack ? String(v.name) + ': ' + v.message + '\n' + v.stack.replace(/\n$/, '') : String(v);
    if (v instanceof Date) return isNaN(v) ? 'Invalid Date' : v.toISOString();
    if (v instanceof RegExp) return String(v);
    if (typeof Promise !== 'undefined' && v instanceof Promise) {
      const [st, r] = rf.promise(v);
      return 'Promise { ' + (st === 0 ? '<pending>' : st === 2 ? '<rejected> ' + inspect(r, depth - 1, seen.concat([v])) : inspect(r, depth - 1, seen.concat([v]))) + ' }';
    }
    const inner = seen.concat([v]);
    const nested = (x) => inspect(x, depth - 1, inner);
    let parts;
    let open = '{';
    let close = '}';
    let prefix = '';
    if (Array.isArray(v)) {
      if (depth < 0) return '[Array]';
      parts = [];
      const n = Math.min(v.length, 100);
      for (let i = 0; i < n; i++) parts.push(i in v ? nested(v[i]) : '<empty>');
      if (v.length > n) parts.push('... ' + (v.length - n) + ' more items');
      open = '[';
      close = ']';
    } else if (ArrayBuffer.isView(v) && !(v instanceof DataView)) {
      prefix = v.constructor.name + '(' + v.length + ') ';
      parts = Array.from(v.slice(0, 100), (x) => String(x));
      if (v.length > 100) parts.push('... ' + (v.length - 100) + ' more items');
      open = '[';
      close = ']';
    } else if (v instanceof Map) {
      if (depth < 0) return '[Map]';
      prefix = 'Map(' + v.size + ') ';
      parts = Array.from(v, ([k, x]) => nested(k) + ' => ' + nested(x));
    } else if (v instanceof Set) {
      if (depth < 0) return '[Set]';
      prefix = 'Set(' + v.size + ') ';
      parts = Array.from(v, nested);
    } else {
      const proto = Object.getPrototypeOf(v);
      const ctor = proto && proto.constructor && proto.constructor.name;
      if (proto === null) prefix = '[Object: null prototype] ';
      else if (ctor && ctor !== 'Object') prefix = ctor + ' ';
      if (depth < 0) return '[' + (ctor || 'Object') + ']';
      parts = [];
      for (const k of Reflect.ownKeys(v)) {
        const d = Object.getOwnPropertyDescriptor(v, k);
        if (!d || !d.enumerable) continue;
        parts.push(key(k) + ': ' + ('value' in d ? nested(d.value) : d.get && d.set ? '[Getter/Setter]' : d.get ? '[Getter]' : '[Setter]'));
      }
    }
    if (!parts.length) return prefix + open + close;
    const line = prefix + open + ' ' + parts.join(', ') + ' ' + close;
    if (line.length <= 72 && !line.includes('\n')) return line;
    return prefix + open + '\n' + parts.map((p) => '  ' + p.replace(/\n/g, '\n  ')).join(',\n') + '\n' + close;
  }

  // console.log's formatting: printf-style directives in a first string argument, then the
  // rest separated by spaces (strings as they are, anything else inspected).
  function format(args) {
    let i = 0;
    let head = '';
    if (typeof args[0] === 'string' && args.length > 1 && args[0].includes('%')) {
      i = 1;
      head = args[0].replace(/%([sdifjoOc%])/g, (m, d) => {
        if (d === '%') return '%';
        if (i >= args.length) return m;
        const a = args[i++];
        switch (d) {
          case 's':
            return typeof a === 'string' ? a : inspect(a, 1, [0]);
          case 'd':
          case 'i':
            return typeof a === 'bigint' ? a + 'n' : String(d === 'i' ? parseInt(a) : Number(a));
          case 'f':
            return String(parseFloat(a));
          case 'j':
            return JSON.stringify(a);
          case 'c':
            return '';
          default:
            return inspect(a, 4, [0]);
        }
      });
    }
    const rest = args.slice(i).map((a) => (typeof a === 'string' ? a : inspect(a)));
    return i ? [head].concat(rest).join(' ') : rest.join(' ');
  }

  const counts = new Map();
  const timersStarted = new Map();
  let groupIndent = '';
  const say = (fd) => (...a) => out(fd, (groupIndent ? format(a).replace(/^/gm, groupIndent) : format(a)) + '\n');
  const console = {
    log: say(1),
    info: say(1),
    debug: say(1),
    error: say(2),
    warn: say(2),
    trace: (...a) => say(2)('Trace: ' + format(a) + '\n' + (new Error().stack || '').replace(/\n$/, '')),
    dir: (v) => say(1)(inspect(v)),
    assert: (c, ...a) => {
      if (!c) say(2)('Assertion failed' + (a.length ? ': ' + format(a) : ''));
    },
    count: (label = 'default') => {
      counts.set(label, (counts.get(label) || 0) + 1);
      say(1)(label + ': ' + counts.get(label));
    },
    countReset: (label = 'default') => counts.delete(label),
    time: (label = 'default') => timersStarted.set(label, Date.now()),
    timeEnd: (label = 'default') => {
      if (timersStarted.has(label)) say(1)(label + ': ' + (Date.now() - timersStarted.get(label)) + 'ms');
      timersStarted.delete(label);
    },
    timeLog: (label = 'default', ...a) => {
      if (timersStarted.has(label)) say(1)(label + ': ' + (Date.now() - timersStarted.get(label)) + 'ms' + (a.length ? ' ' + format(a) : ''));
    },
    group: (...a) => {
      if (a.length) say(1)(format(a));
      groupIndent += '  ';
    },
    groupEnd: () => {
      groupIndent = groupIndent.slice(2);
    },
    table: (v) => say(1)(inspect(v)),
  };
  console.groupCollapsed = console.group;
  const hidden = (name, value) => Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: false });
  hidden('console', console);
  hidden('print', (...a) => out(1, format(a) + '\n'));

  // ---- timers -------------------------------------------------------------------------
  let nextTimer = 1;
  const timers = new Map(); // id -> { due, fn, args, every }
  function addTimer(fn, ms, args, every) {
    if (typeof fn !== 'function') throw new TypeError('The "callback" argument must be of type function');
    const id = nextTimer++;
    ms = Math.max(1, Number(ms) || 0);
    timers.set(id, { due: Date.now() + ms, seq: id, fn, args, every: every ? ms : 0 });
    return id;
  }
  hidden('setTimeout', (fn, ms, ...args) => addTimer(fn, ms, args, false));
  hidden('setInterval', (fn, ms, ...args) => addTimer(fn, ms, args, true));
  hidden('setImmediate', (fn, ...args) => addTimer(fn, 0, args, false));
  hidden('clearTimeout', (id) => timers.delete(id));
  hidden('clearInterval', (id) => timers.delete(id));
  hidden('clearImmediate', (id) => timers.delete(id));
  hidden('queueMicrotask', (fn) => {
    Promise.resolve().then(fn);
  });

  // Runs promise jobs, then due timers one at a time (each followed by its jobs), until
  // `until()` holds or nothing is left to run.
  function drain(until) {
    rf.runJobs();
    while (!(until && until()) && timers.size) {
      let first = null;
      for (const [id, t] of timers) if (!first || t.due < first[1].due || (t.due === first[1].due && t.seq < first[1].seq)) first = [id, t];
      const [id, t] = first;
      const wait = t.due - Date.now();
      if (wait > 0) rf.sleep(wait);
      if (t.every) {
        t.due = Math.max(t.due + t.every, Date.now());
        t.seq = nextTimer++;
      } else timers.delete(id);
      t.fn.apply(undefined, t.args);
      rf.runJobs();
    }
  }

  // ---- process --------------------------------------------------------------------------
  const stream = (fd) => ({
    write(s, enc, cb) {
      out(fd, typeof s === 'string' ? s : String(s));
      if (typeof enc === 'function') enc();
      else if (typeof cb === 'function') cb();
      return true;
    },
    isTTY: false,
  });
  const process = {
    argv: ['node'],
    env: rf.env(),
    platform: 'wasi',
    version: 'v0.0.0-quickjs',
    versions: { quickjs: 'ng' },
    exitCode: undefined,
    stdout: stream(1),
    stderr: stream(2),
    cwd: () => '/home/user',
    exit(code) {
      flushAll();
      rf.exit(code === undefined ? process.exitCode | 0 : code | 0);
    },
    nextTick: (fn, ...args) => {
      Promise.resolve().then(() => fn(...args));
    },
    hrtime: Object.assign(
      (prev) => {
        const ns = BigInt(Math.round(performance.now() * 1e6));
        const t = [Number(ns / 1000000000n), Number(ns % 1000000000n)];
        if (!prev) return t;
        let s = t[0] - prev[0];
        let n = t[1] - prev[1];
        if (n < 0) {
          s -= 1;
          n += 1e9;
        }
        return [s, n];
      },
      { bigint: () => BigInt(Math.round(performance.now() * 1e6)) },
    ),
  };
  hidden('process', process);
  const require = (name) => {
    const e = new Error("Cannot find module '" + name + "': the wasm tier's JavaScript (QuickJS) has no module loader and no Node built-ins");
    e.code = 'MODULE_NOT_FOUND';
    throw e;
  };
  hidden('require', require);

  // ---- the kernel -----------------------------------------------------------------------
  function now() {
    return new Date().toISOString().replace(/\.(\d{3})Z$/, '.$1000Z');
  }
  function emit(msg) {
    rf.write(1, JSON.stringify(msg) + '\n');
  }
  function writer(type, id) {
    let buf = '';
    return {
      write(s) {
        // Line-buffered, as a terminal is: console.log's text and its newline are one message.
        buf += s;
        const cut = buf.lastIndexOf('\n');
        if (cut >= 0) {
          emit({ id, type, text: buf.slice(0, cut + 1), timestamp: now() });
          buf = buf.slice(cut + 1);
        }
      },
      flush() {
        if (buf) emit({ id, type, text: buf, timestamp: now() });
        buf = '';
      },
    };
  }
  function flushAll() {
    if (sinks) {
      sinks[1].flush();
      sinks[2].flush();
    }
  }
  // A thrown value as name, value and traceback (the stack without this file's frames).
  function thrown(e) {
    if (e instanceof Error) {
      const name = String(e.name || 'Error');
      const value = String(e.message ?? '');
      const stack = typeof e.stack === 'string' ? e.stack.split('\n').filter((l) => l && !l.includes('<turn>')).join('\n') : '';
      return { name, value, traceback: name + ': ' + value + (stack ? '\n' + stack : '') };
    }
    let shown;
    try {
      shown = inspect(e, 2, [0]);
    } catch (_) {
      shown = '<uninspectable value>';
    }
    return { name: 'Error', value: typeof e === 'string' ? e : shown, traceback: 'Uncaught ' + shown };
  }

  let count = 0;
  function run(id, code, envVars) {
    count += 1;
    emit({ id, type: 'number_of_executions', execution_count: count });
    const saved = [];
    for (const [k, v] of Object.entries(envVars || {})) {
      saved.push([k, Object.prototype.hasOwnProperty.call(process.env, k), process.env[k]]);
      process.env[k] = String(v);
    }
    sinks = [null, writer('stdout', id), writer('stderr', id)];
    try {
      let value;
      if (/\bawait\b/.test(code)) {
        const p = rf.evalScript(code, '<cell-' + count + '>', true);
        let st;
        drain(() => (st = rf.promise(p))[0] !== 0);
        st = rf.promise(p);
        if (st[0] === 0) throw new Error('the cell awaited a promise that nothing will settle');
        if (st[0] === 2) throw st[1];
        value = st[1] && st[1].value;
      } else {
        value = rf.evalScript(code, '<cell-' + count + '>', false);
        drain();
      }
      if (value !== undefined) {
        globalThis._ = value;
        let text;
        try {
          text = typeof value === 'string' ? value : inspect(value);
        } catch (e) {
          text = '<uninspectable value: ' + (e && e.message) + '>';
        }
        flushAll();
        emit({ id, type: 'result', is_main_result: true, text });
      }
    } catch (e) {
      flushAll();
      emit(Object.assign({ id, type: 'error' }, thrown(e)));
    } finally {
      flushAll();
      sinks = null;
      for (const [k, had, v] of saved) {
        if (had) process.env[k] = v;
        else delete process.env[k];
      }
    }
  }

  function handle(line) {
    const req = JSON.parse(line);
    if (req.op === 'execute') run(String(req.id ?? ''), String(req.code ?? ''), req.env_vars);
    else if (req.op === 'set_env') {
      for (const [k, v] of Object.entries(req.env || {})) process.env[k] = String(v);
    }
  }

  // `node -e CODE [ARGS]`, `node -p CODE`, `node FILE [ARGS]`: argv as Node has it.
  function main(argsJson) {
    const args = JSON.parse(argsJson);
    let code;
    let name;
    let printIt = false;
    if (args[0] === '-e' || args[0] === '--eval' || args[0] === '-p' || args[0] === '--print') {
      printIt = args[0] === '-p' || args[0] === '--print';
      code = args[1];
      name = '[eval]';
      process.argv = ['node'].concat(args.slice(2));
    } else {
      name = args[0];
      code = rf.readFile(name).replace(/^#!.*/, '');
      process.argv = ['node', name].concat(args.slice(1));
    }
    try {
      const v = rf.evalScript(code, name, false);
      if (printIt) console.log(v);
      drain();
    } catch (e) {
      const t = thrown(e);
      rf.write(2, 'Uncaught ' + t.traceback + '\n');
      rf.exit(1);
    }
    if (process.exitCode) rf.exit(process.exitCode | 0);
  }

  hidden('__ringfence', Object.freeze({ handle, main }));
})();
