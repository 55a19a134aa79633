// The attention viewer: one head's pattern on one example, clean and counterfactual side by side.
// Data: contract C (section "attention"): patterns are u8 [examples, 2, heads, T, T], round(p * 255).
(function () {
  'use strict';
  const A = MS.data('attention');
  const $ = id => document.getElementById(id);
  const pat = MS.column(A.patterns), T = A.T, nH = A.heads.length, nX = A.examples.length;
  const headEl = $('av-head'), exEl = $('av-example'), panels = $('av-panels');
  const SPAN_COLORS = ['#e0e7ff', '#fde68a', '#bbf7d0', '#fbcfe8', '#bae6fd', '#fed7aa', '#ddd6fe', '#d9f99d', '#fecaca', '#c7d2fe'];
  A.heads.forEach((h, i) => headEl.insertAdjacentHTML('beforeend', `<option value="${i}">${h}</option>`));
  A.examples.forEach((x, i) => { const o = document.createElement('option'); o.value = i; o.textContent = x.label; exEl.appendChild(o); });
  const st = {head: 0, example: 0};

  function weight(x, which, h, q, k) { return pat[(((x * 2 + which) * nH + h) * T + q) * T + k] / 255; }

  function panel(which) {
    const ex = A.examples[st.example][which ? 'counterfactual' : 'clean'];
    const toks = ex.tokens, n = Math.min(toks.length, T);
    const spans = ex.spans && ex.spans.length === toks.length ? ex.spans : null;
    const names = spans ? [...new Set(spans)] : [];
    const color = s => SPAN_COLORS[names.indexOf(s) % SPAN_COLORS.length];
    const cell = Math.max(8, Math.min(22, 420 / Math.max(1, n))), off = 118, band = 6;
    const size = off + n * cell + 4;
    const box = document.createElement('div');
    box.className = 'av-panel';
    box.insertAdjacentHTML('beforeend', `<div class="av-title">${which ? 'counterfactual' : 'clean'}</div>`);
    const svg = MS.el('svg', {viewBox: `0 0 ${size} ${size}`, width: size, height: size, class: 'av-svg',
                              'data-which': which ? 'counterfactual' : 'clean'}, box);
    const label = t => t.replace(/\s/g, '·');
    for (let i = 0; i < n; i++) {
      const y = off + i * cell;
      if (spans) {
        MS.el('rect', {x: off - band - 2, y: y, width: band, height: cell - 1, fill: color(spans[i])}, svg);
        MS.el('rect', {x: off + i * cell, y: off - band - 2, width: cell - 1, height: band, fill: color(spans[i])}, svg);
      }
      MS.el('text', {x: off - band - 5, y: y + cell * 0.72, 'text-anchor': 'end', class: 'av-tok'}, svg).textContent = label(toks[i]);
      MS.el('text', {x: 0, y: 0, class: 'av-tok',
                     transform: `translate(${off + i * cell + cell * 0.7},${off - band - 5}) rotate(-60)`}, svg).textContent = label(toks[i]);
    }
    const h = st.head, x = st.example;
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
      const w = weight(x, which, h, q, k);
      MS.el('rect', {x: off + k * cell, y: off + q * cell, width: cell - 1, height: cell - 1, class: 'av-cell',
                     fill: `rgba(124, 58, 237, ${Math.max(0.025, w).toFixed(3)})`, 'data-q': q, 'data-k': k, 'data-w': w.toFixed(4)}, svg);
    }
    if (spans) for (let i = 1; i < n; i++) if (spans[i] !== spans[i - 1]) {   // span boundaries
      const p = off + i * cell - 0.5;
      MS.el('line', {x1: p, y1: off, x2: p, y2: off + n * cell, class: 'av-sep'}, svg);
      MS.el('line', {x1: off, y1: p, x2: off + n * cell, y2: p, class: 'av-sep'}, svg);
    }
    svg.addEventListener('mousemove', evt => {
      const c = evt.target;
      if (!c.classList || !c.classList.contains('av-cell')) { MS.hideTooltip(); return; }
      const q = +c.dataset.q, k = +c.dataset.k;
      const where = i => spans ? ` (${spans[i]})` : '';
      MS.tooltip(evt, `query ${q}: ${JSON.stringify(toks[q])}${where(q)}\nkey ${k}: ${JSON.stringify(toks[k])}${where(k)}\nweight ${(+c.dataset.w).toFixed(3)}`);
    });
    svg.addEventListener('mouseleave', () => MS.hideTooltip());
    if (spans) {
      const legend = document.createElement('div');
      legend.className = 'av-spans';
      names.forEach(s => legend.insertAdjacentHTML('beforeend', `<span><i style="background:${color(s)}"></i>${s}</span>`));
      box.appendChild(legend);
    }
    return box;
  }

  function draw() {
    const t = performance.now();
    panels.textContent = '';
    if (!nH || !nX) { panels.textContent = 'No attention patterns in this report.'; return; }
    panels.appendChild(panel(0));
    panels.appendChild(panel(1));
    api.renderMs = performance.now() - t;
    panels.dataset.head = A.heads[st.head];
    panels.dataset.example = st.example;
  }
  function select(head, example) {
    if (head !== undefined && head !== null) st.head = Math.max(0, Math.min(nH - 1, head | 0));
    if (example !== undefined && example !== null) st.example = Math.max(0, Math.min(nX - 1, example | 0));
    headEl.value = st.head; exEl.value = st.example;
    draw();
  }
  headEl.addEventListener('change', () => select(+headEl.value));
  exEl.addEventListener('change', () => select(null, +exEl.value));
  // A head clicked in the circuit viewer (its name without the span).
  window.addEventListener('ms-head', evt => {
    const i = A.heads.indexOf(evt.detail);
    if (i >= 0) select(i);
  });
  const api = {renderMs: NaN, state: st, select,
               cells: which => Array.from(panels.querySelectorAll(`svg[data-which=${which}] rect.av-cell`), c => [+c.dataset.q, +c.dataset.k, +c.dataset.w])};
  window.MS.attention = api;
  select(0, 0);
})();
