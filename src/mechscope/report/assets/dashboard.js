// Feature dashboards: an index of latents (search, sort, pages) and one latent's dashboard drawn on demand.
// Data (section "dashboard", report/sections/dashboard.py): latent-major typed-array columns.
(function () {
  'use strict';
  const t0 = performance.now();
  const D = MS.data('dashboard');
  const $ = id => document.getElementById(id);
  const L = D.n, N = D.top, Q = D.bands * D.per_band, W = D.before + 1 + D.after, B = D.bins, T = D.T;
  const S = D.strings;
  const tokens = MS.column(D.tokens), density = MS.column(D.density), maxAct = MS.column(D.max);
  const meanAct = MS.column(D.mean), count = MS.column(D.count), hist = MS.column(D.hist);
  const topTok = MS.column(D.top_token), topVal = MS.column(D.top_value), topWin = MS.column(D.top_window);
  const qTok = MS.column(D.q_token), qVal = MS.column(D.q_value), qWin = MS.column(D.q_window);
  const G = D.logits, K = G ? G.k : 0;
  const up = G ? MS.column(G.up) : null, upV = G ? MS.column(G.up_value) : null;
  const down = G ? MS.column(G.down) : null, downV = G ? MS.column(G.down_value) : null;
  const decodeMs = performance.now() - t0;
  const PAGE = 50;
  const st = {query: '', sort: 'density', dead: false, page: 0, open: -1, order: null};
  const api = {state: st, renders: 0, renderMs: NaN, indexMs: NaN, decodeMs: decodeMs, loadMs: NaN};
  MS.dashboard = api;

  const esc = s => s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  // newlines and tabs as symbols; a token of spaces only as visible spaces (else it is an empty box)
  const show = s => esc((/^ +$/.test(s) ? s.replace(/ /g, '␣') : s).replace(/\n/g, '⏎').replace(/\t/g, '⇥'));
  const pct = x => x === 0 ? '0' : x >= 0.01 ? (100 * x).toFixed(2) + '%' : (100 * x).toPrecision(2) + '%';

  // ---- the index ----------------------------------------------------------------------------
  function matches(query) {
    // latent ids: a number (or #number); else latents among whose top-activating tokens or promoted
    // tokens is the query (case-insensitive, surrounding spaces ignored; `prefix*` matches a prefix)
    const q = query.trim();
    if (!q) return null;
    const num = /^#?(\d+)$/.exec(q);
    if (num) { const i = +num[1]; return i < L ? [i] : []; }
    const prefix = q.endsWith('*'), needle = (prefix ? q.slice(0, -1) : q).trim().toLowerCase();
    const hit = new Uint8Array(S.length);
    let any = false;
    for (let s = 0; s < S.length; s++) {
      const text = S[s].trim().toLowerCase();
      if (prefix ? text.startsWith(needle) : text === needle) { hit[s] = 1; any = true; }
    }
    if (!any) return [];
    const out = [];
    for (let i = 0; i < L; i++) {
      let found = false;
      for (let j = i * N, e = j + N; j < e && !found; j++) { const g = topTok[j]; if (g >= 0 && hit[tokens[g]]) found = true; }
      for (let j = i * K, e = j + K; j < e && !found; j++) if (hit[up[j]]) found = true;
      if (found) out.push(i);
    }
    return out;
  }
  function order() {
    const found = matches(st.query);
    let ids;
    if (found) ids = Uint32Array.from(found);
    else {
      ids = new Uint32Array(L);
      let n = 0;
      for (let i = 0; i < L; i++) if (st.dead || count[i] > 0) ids[n++] = i;
      ids = ids.subarray(0, n);
    }
    const key = st.sort === 'max' ? maxAct : st.sort === 'mean' ? meanAct : st.sort === 'density' ? density : null;
    if (key) ids.sort((a, b) => (key[b] - key[a]) || (a - b));
    else ids.sort();
    return ids;
  }
  function topToken(i) {
    const g = topTok[i * N];
    return g >= 0 ? S[tokens[g]] : '';
  }
  function drawIndex() {
    const t = performance.now();
    const ids = st.order, pages = Math.max(1, Math.ceil(ids.length / PAGE));
    st.page = Math.max(0, Math.min(pages - 1, st.page));
    const rows = [];
    for (let r = st.page * PAGE, e = Math.min(ids.length, r + PAGE); r < e; r++) {
      const i = ids[r];
      const prom = [];
      for (let j = 0; j < Math.min(3, K); j++) prom.push(`<code>${show(S[up[i * K + j]])}</code>`);
      rows.push(`<tr data-latent="${i}"${i === st.open ? ' class="db-open"' : ''}><td class="num">${i}</td>` +
                `<td class="num">${pct(density[i])}</td><td class="num">${MS.fmt(maxAct[i])}</td>` +
                `<td><code>${show(topToken(i))}</code></td><td>${prom.join(' ')}</td></tr>`);
    }
    $('db-table').tBodies[0].innerHTML = rows.join('');
    $('db-page').textContent = `page ${st.page + 1} of ${pages}`;
    $('db-count').textContent = `${ids.length.toLocaleString('en-US')} of ${L.toLocaleString('en-US')} latents`;
    $('db-count').dataset.n = ids.length;
    $('db-prev').disabled = st.page === 0;
    $('db-next').disabled = st.page >= pages - 1;
    api.indexMs = performance.now() - t;
  }
  function refresh() { st.order = order(); drawIndex(); }

  // ---- one latent ---------------------------------------------------------------------------
  function context(tok, val, win, row, i) {
    // one example: the window around token `tok` (global id), shaded by u8 activations
    if (tok < 0) return '';
    const s = Math.floor(tok / T), p = tok % T, peak = maxAct[i];
    let html = `<div class="db-ctx"><span class="db-act">${MS.fmt(val)}</span><span class="db-toks">`;
    for (let w = 0; w < W; w++) {
      const at = p - D.before + w;
      if (at < 0 || at >= T) continue;
      const a = win[row * W + w] / 255;
      const str = S[tokens[s * T + at]];
      html += `<span class="db-tok${at === p ? ' db-max' : ''}" style="background:rgba(234,88,12,${a.toFixed(3)})" ` +
              `title="${esc(JSON.stringify(str))}: ${MS.fmt(a * peak)}">${show(str)}</span>`;
    }
    return html + '</span></div>';
  }
  function histogram(i) {
    const lo = D.log2_range[0], hi = D.log2_range[1], step = (hi - lo) / B;
    let first = B, last = -1, top = 0;
    for (let b = 0; b < B; b++) { const c = hist[i * B + b]; if (c) { first = Math.min(first, b); last = b; top = Math.max(top, c); } }
    if (last < 0) return '<p class="note">never fires on these tokens</p>';
    const w = 320, h = 90, n = last - first + 1, bw = w / n;
    let svg = `<svg class="db-hist" viewBox="0 0 ${w} ${h + 16}" width="${w}" height="${h + 16}">`;
    for (let b = first; b <= last; b++) {
      const c = hist[i * B + b], bh = c ? Math.max(1, h * c / top) : 0;
      const a = Math.pow(2, lo + b * step), z = Math.pow(2, lo + (b + 1) * step);
      svg += `<rect x="${(b - first) * bw}" y="${h - bh}" width="${Math.max(1, bw - 1)}" height="${bh}">` +
             `<title>${MS.fmt(a)} to ${MS.fmt(z)}: ${c}</title></rect>`;
    }
    svg += `<text x="0" y="${h + 12}">${MS.fmt(Math.pow(2, lo + first * step))}</text>` +
           `<text x="${w}" y="${h + 12}" text-anchor="end">${MS.fmt(Math.pow(2, lo + (last + 1) * step))}</text></svg>`;
    return svg;
  }
  function logitList(ids, vals, i, cls) {
    if (!G) return '<p class="note">no logit effects</p>';
    let html = `<table class="db-logits ${cls}">`;
    const big = Math.max(1e-30, ...Array.from({length: K}, (_, j) => Math.abs(vals[i * K + j])));
    for (let j = 0; j < K; j++) {
      const v = vals[i * K + j];
      html += `<tr><td><code>${show(S[ids[i * K + j]])}</code></td><td class="num">${v >= 0 ? '+' : ''}${MS.fmt(v)}</td>` +
              `<td><i style="width:${(60 * Math.abs(v) / big).toFixed(1)}px"></i></td></tr>`;
    }
    return html + '</table>';
  }
  function open(i) {
    i = i | 0;
    if (i < 0 || i >= L) return false;
    const t = performance.now();
    st.open = i;
    let html = `<h3>latent ${i}</h3><p class="db-stats">density ${pct(density[i])} (${count[i].toLocaleString('en-US')} of ` +
               `${D.meta.n_tokens.toLocaleString('en-US')} tokens) · max ${MS.fmt(maxAct[i])} · mean when active ` +
               `${MS.fmt(meanAct[i])}</p>`;
    html += `<div class="db-row"><div><h4>activations when active (log scale)</h4>${histogram(i)}</div>` +
            `<div><h4>promotes</h4>${logitList(up, upV, i, 'db-up')}</div>` +
            `<div><h4>suppresses</h4>${logitList(down, downV, i, 'db-down')}</div></div>`;
    html += '<h4>top activations</h4><div class="db-ctxs" id="db-top">';
    for (let r = 0; r < N; r++) html += context(topTok[i * N + r], topVal[i * N + r], topWin, i * N + r, i);
    html += '</div><h4>examples at activation quantiles</h4><div class="db-ctxs" id="db-quantiles">';
    for (let band = D.bands - 1; band >= 0; band--) {
      let rows = '';
      for (let k = 0; k < D.per_band; k++) {
        const r = i * Q + band * D.per_band + k;
        rows += context(qTok[r], qVal[r], qWin, r, i);
      }
      if (rows) html += `<div class="db-band">${band * 100 / D.bands}–${(band + 1) * 100 / D.bands}%</div>${rows}`;
    }
    html += '</div>';
    const box = $('db-latent');
    box.innerHTML = html;
    box.dataset.latent = i;
    for (const tr of $('db-table').tBodies[0].rows) tr.classList.toggle('db-open', +tr.dataset.latent === i);
    api.renders++;
    api.renderMs = performance.now() - t;
    return true;
  }

  // ---- controls -----------------------------------------------------------------------------
  let timer = null;
  $('db-search').addEventListener('input', e => {
    clearTimeout(timer);
    timer = setTimeout(() => api.search(e.target.value), 120);
  });
  $('db-sort').addEventListener('change', e => api.sort(e.target.value));
  $('db-dead').addEventListener('change', e => { st.dead = e.target.checked; st.page = 0; refresh(); });
  $('db-prev').addEventListener('click', () => { st.page--; drawIndex(); });
  $('db-next').addEventListener('click', () => { st.page++; drawIndex(); });
  $('db-table').addEventListener('click', e => {
    const tr = e.target.closest('tr[data-latent]');
    if (tr) open(+tr.dataset.latent);
  });
  api.search = q => { st.query = q; st.page = 0; $('db-search').value = q; refresh(); return Array.from(st.order); };
  api.sort = key => { st.sort = key; $('db-sort').value = key; refresh(); return Array.from(st.order.subarray(0, PAGE)); };
  api.open = open;
  api.page = p => { st.page = p; drawIndex(); };
  api.shown = () => Array.from($('db-table').tBodies[0].rows, tr => +tr.dataset.latent);

  const m = D.meta;
  $('db-meta').textContent = `${m.architecture} dictionary of ${L.toLocaleString('en-US')} latents at ${m.hook_point}` +
    (m.model ? ` of ${m.model}` : '') + `, on ${m.n_tokens.toLocaleString('en-US')} held-out tokens (${m.skipped_bos} BOS ` +
    `and ${m.skipped_padding} padding positions skipped). Logits: ${m.logits}.`;
  refresh();
  api.loadMs = performance.now();   // from navigation start: page parse, data decode and the first index
})();
