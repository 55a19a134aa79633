// Lens section: KL(final || lens) per layer for each lens (log axis, hover for values), and a grid of
// each layer's top prediction per prompt position (rows: layers, columns: positions; colour: its
// probability; hover: the top k). Data: MS.data('lens') = {streams, kl: {lens: [...]}, predictions?}.
(function () {
  const data = MS.data('lens');
  const COLORS = {logit: '#d97706', tuned: '#2563eb'};
  const lenses = Object.keys(data.kl);
  const svg = document.getElementById('lens-kl');
  const W = 720, H = 300, L = 56, R = 12, T = 14, B = 40;
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const n = data.streams.length;
  const vals = [];
  lenses.forEach(k => data.kl[k].forEach(v => { if (v > 0) vals.push(v); }));
  if (vals.length) {
    const y0 = Math.floor(Math.log10(Math.min(...vals))), y1 = Math.ceil(Math.log10(Math.max(...vals)));
    const X = i => L + i / Math.max(1, n - 1) * (W - L - R);
    const Y = v => T + (1 - (Math.log10(v) - y0) / Math.max(1e-9, y1 - y0)) * (H - T - B);
    const axis = MS.el('g', {class: 'axis'}, svg);
    MS.el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B}, axis);
    MS.el('line', {x1: L, y1: T, x2: L, y2: H - B}, axis);
    for (let d = y0; d <= y1; d++) {
      MS.el('line', {x1: L - 4, y1: Y(10 ** d), x2: W - R, y2: Y(10 ** d), stroke: '#eef0f4'}, axis);
      MS.el('text', {x: L - 6, y: Y(10 ** d) + 4, 'text-anchor': 'end'}, axis).textContent = '1e' + d;
    }
    const every = Math.max(1, Math.ceil(n / 16));
    data.streams.forEach((s, i) => {
      if (i % every && i !== n - 1) return;
      MS.el('text', {x: X(i), y: H - B + 14, 'text-anchor': 'middle'}, axis).textContent = s;
    });
    MS.el('text', {x: (L + W - R) / 2, y: H - 6, 'text-anchor': 'middle'}, svg).textContent = 'layer';
    MS.el('text', {x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, 'text-anchor': 'middle'},
          svg).textContent = 'KL(final || lens), nats';
    lenses.forEach(k => {
      const color = COLORS[k] || '#059669';
      const pts = data.kl[k].map((v, i) => [i, v]).filter(p => p[1] > 0);
      MS.el('path', {d: pts.map((p, j) => (j ? 'L' : 'M') + X(p[0]) + ' ' + Y(p[1])).join(' '), stroke: color,
                     'stroke-width': 2, fill: 'none'}, svg);
      pts.forEach(p => {
        const c = MS.el('circle', {cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: color, class: 'lens-point'}, svg);
        c.addEventListener('mousemove', e => MS.tooltip(e, `${k} lens, layer ${data.streams[p[0]]}: KL ${MS.fmt(p[1])}` +
          lenses.filter(o => o !== k).map(o => `\n${o} lens: ${MS.fmt(data.kl[o][p[0]])}`).join('')));
        c.addEventListener('mouseleave', MS.hideTooltip);
      });
    });
  }
  const legend = document.getElementById('lens-legend');
  lenses.forEach(k => {
    const swatch = document.createElement('span');
    swatch.style.background = COLORS[k] || '#059669';
    legend.appendChild(swatch);
    legend.appendChild(document.createTextNode(k + ' lens'));
  });

  const pred = data.predictions;
  if (!pred) return;
  const grid = document.getElementById('lens-grid');
  const pick = document.getElementById('lens-pick');
  const show = t => JSON.stringify(t).slice(1, -1);
  function draw() {
    const top = pred.top[pick.value];
    grid.innerHTML = '';
    const head = grid.insertRow();
    head.appendChild(document.createElement('th')).textContent = 'layer';
    pred.tokens.forEach(t => { head.appendChild(document.createElement('th')).textContent = show(t); });
    for (let s = pred.streams.length - 1; s >= 0; s--) {
      const row = grid.insertRow();
      row.appendChild(document.createElement('th')).textContent = pred.streams[s];
      top[s].forEach((cands, p) => {
        const cell = row.insertCell();
        cell.className = 'cell';
        cell.textContent = show(cands[0][0]);
        cell.style.background = `rgba(37, 99, 235, ${(0.08 + 0.6 * cands[0][1]).toFixed(3)})`;
        cell.addEventListener('mousemove', e => MS.tooltip(e,
          `${pick.value} lens, layer ${pred.streams[s]}, after "${show(pred.tokens[p])}" (position ${p})\n` +
          cands.map(c => `${show(c[0]).padEnd(16)} ${(100 * c[1]).toFixed(1)}%`).join('\n')));
        cell.addEventListener('mouseleave', MS.hideTooltip);
      });
    }
  }
  pick.addEventListener('change', draw);
  pick.value = pred.top.tuned ? 'tuned' : 'logit';
  draw();
})();
