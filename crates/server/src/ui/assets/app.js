// Ringfence dashboard. Everything here that a sandbox can influence (metadata, commands,
// file names, output, audit details) is put into the page as text (text nodes, textContent),
// never parsed as HTML; the server's Content-Security-Policy forbids inline script besides.
'use strict';

const POLL_MS = 2000;
const SVG = 'http://www.w3.org/2000/svg';
const state = { key: sessionStorage.getItem('ringfence-key') || '', timer: null, gen: 0, tiers: new Map() };

// ---- DOM helpers (text only) -------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function sandboxLink(id) {
  return el('a', { href: '#/sandbox/' + encodeURIComponent(id), 'data-sandbox': id }, id);
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '';
  const neg = ms < 0; ms = Math.abs(ms);
  const s = Math.floor(ms / 1000), m = Math.floor(s / 60), h = Math.floor(m / 60);
  const out = h ? `${h}h ${m % 60}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  return neg ? '-' + out : out;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function fmtTime(t) {
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? String(t) : d.toLocaleString();
}

// ---- API ---------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, opts = {}) {
  const headers = Object.assign({ 'X-API-Key': state.key }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers, cache: 'no-store' }));
  if (r.status === 401) throw new Unauthorized('the API key was refused');
  const text = await r.text();
  let body = text;
  try { body = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: keep the text */ }
  if (!r.ok) {
    const msg = body && typeof body === 'object' && body.message ? body.message : text.slice(0, 300);
    throw new Error(`${r.status}: ${msg}`);
  }
  return body;
}

// envd of one sandbox, reached through the server with the sandbox's access token.
function envd(sb, path, opts = {}) {
  return api(path, Object.assign({}, opts, {
    headers: Object.assign({
      'E2b-Sandbox-Id': sb.sandboxID, 'E2b-Sandbox-Port': '49983',
      'X-Access-Token': sb.envdAccessToken,
    }, opts.headers || {}),
  }));
}

async function auditAll(params, max = 5) {
  const out = [];
  let cursor = '';
  for (let i = 0; i < max; i++) {
    const q = new URLSearchParams(params);
    if (cursor) q.set('cursor', cursor);
    const page = await api('/audit?' + q.toString());
    out.push(...(page.records || []));
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return out;
}

// ---- shell: sign-in, navigation, polling -------------------------------------------------

function showSignin(message) {
  stopPolling();
  state.key = '';
  sessionStorage.removeItem('ringfence-key');
  document.getElementById('signin').hidden = false;
  document.getElementById('view').hidden = true;
  document.getElementById('nav').hidden = true;
  document.getElementById('live').hidden = true;
  document.getElementById('signin-error').textContent = message || '';
}

async function signIn(key) {
  state.key = key;
  try {
    await api('/sandboxes?limit=1');
  } catch (e) {
    showSignin(e instanceof Unauthorized ? 'That API key was refused.' : `Sign-in failed: ${e.message}`);
    return;
  }
  sessionStorage.setItem('ringfence-key', key);
  document.getElementById('signin').hidden = true;
  document.getElementById('view').hidden = false;
  document.getElementById('nav').hidden = false;
  document.getElementById('live').hidden = false;
  route();
}

function stopPolling() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
  state.gen++;
}

// Runs `render` now and every POLL_MS while this view is shown; a failed poll marks the page
// stale and keeps what is shown.
function poll(render) {
  stopPolling();
  const gen = state.gen;
  const live = document.getElementById('live');
  const tick = async () => {
    if (gen !== state.gen) return;
    try {
      await render(() => gen === state.gen);
      live.textContent = 'live · ' + new Date().toLocaleTimeString();
      live.classList.remove('stale');
    } catch (e) {
      if (e instanceof Unauthorized) { showSignin('The API key was refused.'); return; }
      live.textContent = 'stale: ' + e.message;
      live.classList.add('stale');
    }
    if (gen === state.gen) state.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function setView(...children) {
  const v = document.getElementById('view');
  v.replaceChildren(...children);
  return v;
}

function route() {
  if (!state.key) { showSignin(''); return; }
  const h = location.hash.replace(/^#/, '') || '/';
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', a.getAttribute('href') === '#' + h);
  }
  const m = h.match(/^\/sandbox\/(.+)$/);
  if (m) return sandboxPage(decodeURIComponent(m[1]));
  if (h === '/templates') return templatesPage();
  if (h === '/audit') return auditPage();
  if (h === '/alerts') return alertsPage();
  return sandboxesPage();
}

// ---- charts ------------------------------------------------------------------------------

function sparkline(values, cls, max) {
  const s = svg('svg', { class: 'spark', viewBox: '0 0 120 26', preserveAspectRatio: 'none', role: 'img' });
  if (values.length > 1) {
    const top = Math.max(max || 0, ...values, 1e-9);
    const pts = values.map((v, i) => `${(i / (values.length - 1)) * 120},${25 - (v / top) * 24}`);
    s.append(svg('polyline', { class: cls, points: pts.join(' ') }));
  }
  return s;
}

function chart(title, values, cls, unit, max) {
  const W = 600, H = 150, L = 40;
  const s = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
  const top = Math.max(max || 0, ...values.map((p) => p[1]), 1e-9);
  for (let i = 0; i <= 4; i++) {
    const y = 10 + (i / 4) * (H - 30);
    s.append(svg('line', { class: 'grid', x1: L, x2: W, y1: y, y2: y }));
    const t = svg('text', { x: 2, y: y + 3 });
    t.textContent = `${(top * (1 - i / 4)).toFixed(top < 10 ? 1 : 0)}${unit}`;
    s.append(t);
  }
  if (values.length > 1) {
    const t0 = values[0][0], t1 = values[values.length - 1][0] || t0 + 1;
    const pts = values.map(([t, v]) => `${L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L)},${10 + (1 - v / top) * (H - 30)}`);
    s.append(svg('polyline', { class: cls, points: pts.join(' ') }));
    const span = svg('text', { x: L, y: H - 4 });
    span.textContent = `last ${fmtDuration((t1 - t0) * 1000)}`;
    s.append(span);
  }
  return el('figure', {}, el('figcaption', {}, title), s);
}

// ---- views -------------------------------------------------------------------------------

async function tierOf(id) {
  if (!state.tiers.has(id)) {
    const d = await api('/sandboxes/' + encodeURIComponent(id));
    state.tiers.set(id, d.tier || '');
  }
  return state.tiers.get(id);
}

function metadataTags(md) {
  return Object.entries(md || {}).map(([k, v]) => el('span', { class: 'tag' }, `${k}=${v}`));
}

function sandboxesPage() {
  const tbody = el('tbody');
  const empty = el('p', { class: 'muted', hidden: true }, 'No sandboxes. Create one with an SDK, the API or MCP.');
  setView(
    el('h1', {}, 'Sandboxes'),
    el('table', { id: 'sandboxes' },
      el('thead', {}, el('tr', {}, ['Sandbox', 'State', 'Tier', 'Template', 'Age', 'Time left', 'CPU', 'Memory', 'Metadata'].map((h) => el('th', {}, h)))),
      tbody),
    empty,
  );
  poll(async (current) => {
    const list = await api('/sandboxes');
    const since = Math.floor(Date.now() / 1000) - 600;
    const rows = await Promise.all(list.map(async (sb) => {
      const [tier, samples] = await Promise.all([
        tierOf(sb.sandboxID).catch(() => ''),
        api(`/sandboxes/${encodeURIComponent(sb.sandboxID)}/metrics?start=${since}`).catch(() => []),
      ]);
      const now = Date.now();
      const cpu = samples.map((x) => x.cpuUsedPct);
      const mem = samples.map((x) => x.memUsed / 1048576);
      const last = samples[samples.length - 1];
      return el('tr', { 'data-sandbox': sb.sandboxID },
        el('td', { class: 'mono' }, sandboxLink(sb.sandboxID)),
        el('td', { class: 'state-' + sb.state }, sb.state),
        el('td', {}, tier),
        el('td', {}, sb.templateID),
        el('td', { class: 'num' }, fmtDuration(now - Date.parse(sb.startedAt))),
        el('td', { class: 'num' }, sb.state === 'running' ? fmtDuration(Date.parse(sb.endAt) - now) : '—'),
        el('td', { class: 'spark-cell', title: last ? `${last.cpuUsedPct}%` : '' }, sparkline(cpu, 'cpu', 100), ' ', last ? `${last.cpuUsedPct.toFixed(0)}%` : ''),
        el('td', { class: 'spark-cell', title: last ? fmtBytes(last.memUsed) : '' }, sparkline(mem, 'mem'), ' ', last ? fmtBytes(last.memUsed) : ''),
        el('td', {}, metadataTags(sb.metadata)),
      );
    }));
    if (!current()) return;
    tbody.replaceChildren(...rows);
    empty.hidden = rows.length > 0;
  });
}

function securityText(ev) {
  const who = ev.comm ? ` by ${ev.comm}` : '';
  const pid = ev.pid ? ` (pid ${ev.pid})` : '';
  return `${ev.kind}: ${ev.syscall} denied${who}${pid} ×${ev.count}`;
}

function exitCell(code) {
  if (code === null || code === undefined) return el('td', {}, '—');
  return el('td', { class: code === 0 ? 'exit-ok num' : 'exit-bad num' }, String(code));
}

function sandboxPage(id) {
  const facts = el('dl', { class: 'facts' });
  const charts = el('div', { class: 'charts' });
  const execs = el('tbody');
  const security = el('tbody');
  const egress = el('tbody');
  const alerts = el('tbody');
  const files = el('div', { id: 'files' });
  const status = el('p', { class: 'error', role: 'alert' });
  let sb = null;
  let filePath = '/home/user';
  const killBtn = el('button', {
    class: 'danger', type: 'button', id: 'kill',
    onclick: async () => {
      if (!confirm(`Kill sandbox ${id}? Its files are discarded.`)) return;
      try {
        await api('/sandboxes/' + encodeURIComponent(id), { method: 'DELETE' });
        location.hash = '#/';
      } catch (e) { status.textContent = `Kill failed: ${e.message}`; }
    },
  }, 'Kill sandbox');
  const table = (heads, body) => el('table', {}, el('thead', {}, el('tr', {}, heads.map((h) => el('th', {}, h)))), body);
  setView(
    el('p', { class: 'crumbs' }, el('a', { href: '#/' }, '← Sandboxes')),
    el('h1', {}, 'Sandbox ', el('span', { class: 'mono' }, id), ' ', killBtn),
    status, facts,
    el('h2', {}, 'Metrics'), charts,
    el('h2', {}, 'Commands and cells'),
    table(['Time', 'Kind', 'Command / code', 'Exit', 'Duration', 'Security events'], execs),
    el('h2', {}, 'Security events'),
    table(['Time', 'Event', 'Detail'], security),
    el('h2', {}, 'Egress decisions'),
    table(['Time', 'Decision', 'Destination and reason'], egress),
    el('h2', {}, 'Alerts'),
    table(['Time', 'Alert', 'Value', 'Threshold'], alerts),
    el('h2', {}, 'Files'), files,
  );

  async function showDir(path) {
    filePath = path;
    const listing = await envd(sb, '/filesystem.Filesystem/ListDir', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ path, depth: 1 }),
    });
    const entries = (listing.entries || []).slice().sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const up = path.replace(/\/[^/]*\/?$/, '') || '/';
    const rows = entries.map((e) => {
      const dir = String(e.type || '').includes('DIRECTORY');
      const link = el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); (dir ? showDir(e.path) : showFile(e.path)).catch(fileError); } }, e.name + (dir ? '/' : ''));
      return el('tr', {}, el('td', { class: 'mono' }, link), el('td', { class: 'num' }, dir ? '' : fmtBytes(Number(e.size || 0))));
    });
    files.replaceChildren(
      el('p', {}, el('span', { class: 'mono' }, path), ' ',
        path !== '/' ? el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); showDir(up).catch(fileError); } }, '(up)') : null),
      el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'Name'), el('th', {}, 'Size'))), el('tbody', {}, rows)),
    );
  }
  async function showFile(path) {
    const text = await envd(sb, '/files?path=' + encodeURIComponent(path));
    const shown = typeof text === 'string' ? text : JSON.stringify(text, null, 2);
    files.replaceChildren(
      el('p', {}, el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); showDir(filePath).catch(fileError); } }, '← back'), ' ', el('span', { class: 'mono' }, path)),
      el('pre', { class: 'file' }, shown.slice(0, 65536)),
    );
  }
  function fileError(e) { files.replaceChildren(el('p', { class: 'error' }, `Files: ${e.message}`)); }

  let filesShown = false;
  poll(async (current) => {
    let detail;
    try {
      detail = await api('/sandboxes/' + encodeURIComponent(id));
    } catch (e) {
      if (e instanceof Unauthorized) throw e;
      detail = null;
    }
    const since = Math.floor(Date.now() / 1000) - 3600;
    const [samples, records] = await Promise.all([
      detail && detail.state === 'running' ? api(`/sandboxes/${encodeURIComponent(id)}/metrics?start=${since}`).catch(() => []) : [],
      auditAll({ sandbox: id, limit: 1000 }),
    ]);
    if (!current()) return;
    if (!detail) {
      status.textContent = 'This sandbox is not running (killed or timed out); its audit trail remains below.';
      killBtn.hidden = true;
    } else {
      sb = detail;
      const now = Date.now();
      const pairs = [
        ['State', detail.state], ['Tier', detail.tier || ''], ['Template', detail.templateID],
        ['Started', fmtTime(detail.startedAt)], ['Age', fmtDuration(now - Date.parse(detail.startedAt))],
        ['Time left', fmtDuration(Date.parse(detail.endAt) - now)],
        ['CPU / memory', `${detail.cpuCount} vCPU, ${detail.memoryMB} MiB`],
        ['Internet', detail.allowInternetAccess === false ? 'off' : 'on'],
      ];
      facts.replaceChildren(...pairs.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]),
        el('dt', {}, 'Metadata'), el('dd', { id: 'metadata' }, metadataTags(detail.metadata)));
      charts.replaceChildren(
        chart('CPU (%)', samples.map((x) => [x.timestampUnix, x.cpuUsedPct]), 'cpu', '%', 100),
        chart('Memory (MiB)', samples.map((x) => [x.timestampUnix, x.memUsed / 1048576]), 'mem', '', detail.memoryMB),
      );
      if (!filesShown) { filesShown = true; showDir(filePath).catch(fileError); }
    }
    const newest = records.slice().reverse();
    execs.replaceChildren(...newest.filter((r) => r.action.startsWith('exec.')).map((r) => {
      const evs = r.security_events || [];
      return el('tr', { class: evs.length ? 'security exec' : 'exec' },
        el('td', {}, fmtTime(r.timestamp)),
        el('td', {}, r.action === 'exec.cell' ? 'cell' : 'command'),
        el('td', {}, el('pre', {}, r.detail.command ?? r.detail.code ?? '')),
        exitCell(r.exit_code),
        el('td', { class: 'num' }, r.duration_ms === null || r.duration_ms === undefined ? '' : `${r.duration_ms} ms`),
        el('td', {}, evs.map((ev) => el('span', { class: 'tag bad' }, securityText(ev)))),
      );
    }));
    security.replaceChildren(...newest.filter((r) => r.action.startsWith('security.')).map((r) => el('tr', { class: 'security' },
      el('td', {}, fmtTime(r.timestamp)), el('td', {}, r.action),
      el('td', {}, (r.security_events || []).map((ev) => el('span', { class: 'tag bad' }, securityText(ev))), el('pre', {}, JSON.stringify(r.detail))))));
    egress.replaceChildren(...newest.filter((r) => r.action.startsWith('network.')).map((r) => {
      const d = r.detail || {};
      const denied = d.allowed === false || r.action === 'network.egress.dropped';
      const decision = r.action === 'network.egress' ? (d.allowed ? 'allowed' : 'denied') : r.action;
      const dest = d.address ? `${d.protocol || ''} ${d.name ? d.name + ' ' : ''}${d.address}:${d.port}` : '';
      const bytes = d.bytes_out !== undefined ? ` · ${fmtBytes(d.bytes_out)} out, ${fmtBytes(d.bytes_in)} in` : '';
      return el('tr', { class: denied ? 'egress-denied' : '' },
        el('td', {}, fmtTime(r.timestamp)), el('td', {}, decision),
        el('td', {}, el('span', { class: 'mono' }, dest), ' ', el('span', { class: 'muted' }, (d.reason || '') + bytes),
          r.action === 'network.egress' ? null : el('pre', {}, JSON.stringify(d))));
    }));
    alerts.replaceChildren(...newest.filter((r) => r.action.startsWith('alert.')).map((r) => el('tr', { class: 'alert' },
      el('td', {}, fmtTime(r.timestamp)), el('td', {}, r.action), el('td', { class: 'num' }, String(r.detail.value ?? '')), el('td', { class: 'num' }, String(r.detail.threshold ?? '')))));
  });
}

function templatesPage() {
  const box = el('div');
  setView(el('h1', {}, 'Templates & pools'), box);
  poll(async (current) => {
    const [ov, snaps, tiers] = await Promise.all([api('/ui/api/overview'), api('/snapshots').catch(() => []), api('/tiers').catch(() => ({ tiers: [] }))]);
    if (!current()) return;
    const pools = ov.pools || {};
    const t = (heads, rows) => el('table', {}, el('thead', {}, el('tr', {}, heads.map((h) => el('th', {}, h)))), el('tbody', {}, rows));
    box.replaceChildren(
      el('h2', {}, 'Templates'),
      t(['Name', 'Kind', 'Source', 'Size', 'Warm pool'], [
        ...ov.builtin.map((n) => el('tr', {}, el('td', { class: 'mono' }, n), el('td', {}, 'built-in'), el('td', {}, ''), el('td', {}, ''), el('td', { class: 'num' }, String(pools[n] ?? '—')))),
        ...ov.images.map((i) => el('tr', {}, el('td', { class: 'mono' }, i.name), el('td', {}, 'image'), el('td', {}, i.source), el('td', { class: 'num' }, fmtBytes(i.size)), el('td', { class: 'num' }, String(pools[i.name] ?? '—')))),
        ...(Array.isArray(snaps) ? snaps : []).map((s) => el('tr', {}, el('td', { class: 'mono' }, (s.names || []).join(', ') || s.snapshotID), el('td', {}, 'snapshot'), el('td', {}, s.snapshotID), el('td', {}, ''), el('td', {}, '—'))),
      ]),
      el('h2', {}, 'Warm pools'),
      Object.keys(pools).length
        ? t(['Template', 'Sandboxes waiting'], Object.entries(pools).map(([k, v]) => el('tr', {}, el('td', { class: 'mono' }, k), el('td', { class: 'num' }, String(v)))))
        : el('p', { class: 'muted' }, 'No warm pools (ringfence serve --pool TEMPLATE=N).'),
      el('h2', {}, 'Isolation tiers'),
      t(['Tier', 'Available here', 'Allowed for this key', 'Notes'], (tiers.tiers || []).map((x) => el('tr', {},
        el('td', {}, x.tier), el('td', {}, x.available ? 'yes' : 'no'), el('td', {}, x.allowedForKey ? 'yes' : 'no'),
        el('td', { class: 'muted' }, x.reason || `${x.isolation || ''}${x.default ? ' (default)' : ''}`)))),
    );
  });
}

function auditTable(records) {
  return el('table', { id: 'audit' },
    el('thead', {}, el('tr', {}, ['Time', 'Action', 'Sandbox', 'Exit', 'Duration', 'Detail'].map((h) => el('th', {}, h)))),
    el('tbody', {}, records.map((r) => el('tr', { class: r.action.startsWith('security.') || (r.security_events || []).length ? 'security' : r.action.startsWith('alert.') ? 'alert' : '' },
      el('td', {}, fmtTime(r.timestamp)), el('td', {}, r.action),
      el('td', { class: 'mono' }, r.sandbox_id ? sandboxLink(r.sandbox_id) : ''),
      exitCell(r.exit_code),
      el('td', { class: 'num' }, r.duration_ms === null || r.duration_ms === undefined ? '' : `${r.duration_ms} ms`),
      el('td', {}, (r.security_events || []).map((ev) => el('span', { class: 'tag bad' }, securityText(ev))),
        Object.keys(r.detail || {}).length ? el('pre', {}, JSON.stringify(r.detail)) : null)))));
}

function auditPage() {
  const field = (name, label, placeholder) => el('label', {}, label, el('input', { name, placeholder }));
  const form = el('form', { class: 'filters', id: 'audit-filters' },
    field('action', 'Action (prefix*)', 'exec.*'), field('sandbox', 'Sandbox', ''),
    field('since', 'Since', 'RFC 3339 or Unix s'), field('until', 'Until', ''),
    el('button', { type: 'submit' }, 'Apply'));
  const out = el('div');
  setView(el('h1', {}, 'Audit trail'), form, out);
  const run = () => poll(async (current) => {
    const params = { limit: 1000 };
    for (const [k, v] of new FormData(form).entries()) if (String(v).trim()) params[k] = String(v).trim();
    const records = await auditAll(params);
    if (!current()) return;
    out.replaceChildren(el('p', { class: 'muted' }, `${records.length} records, newest first`), auditTable(records.reverse()));
  });
  form.addEventListener('submit', (e) => { e.preventDefault(); run(); });
  run();
}

function alertsPage() {
  const out = el('div');
  setView(el('h1', {}, 'Alerts'), el('p', { class: 'muted' }, 'Thresholds crossed (memory, CPU, execution time, start-up time), newest first.'), out);
  poll(async (current) => {
    const records = await auditAll({ action: 'alert.*', limit: 1000 });
    if (!current()) return;
    out.replaceChildren(records.length ? auditTable(records.reverse()) : el('p', { class: 'muted' }, 'No alerts.'));
  });
}

async function refreshAlertCount() {
  if (!state.key) return;
  try {
    const page = await api('/audit?action=' + encodeURIComponent('alert.*') + '&since=' + Math.floor(Date.now() / 1000 - 3600) + '&limit=1000');
    const n = (page.records || []).length;
    const badge = document.getElementById('alert-count');
    badge.textContent = String(n);
    badge.hidden = n === 0;
  } catch (_) { /* the next view poll reports failures */ }
}

// ---- start -------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    signIn(document.getElementById('key').value.trim());
  });
  document.getElementById('signout').addEventListener('click', () => showSignin(''));
  window.addEventListener('hashchange', route);
  setInterval(refreshAlertCount, 10000);
  if (state.key) signIn(state.key); else showSignin('');
  refreshAlertCount();
});
