// Activation patching heatmap. Data: MS.data('patching') = {rows, cols, group, axes, n_examples,
// mean: column [rows * cols], examples: column [n_examples * rows * cols], metric_clean, metric_counterfactual}.
(function () {
  const d = MS.data('patching');
  const mean = MS.column(d.mean), all = MS.column(d.examples);
  const R = d.rows.length, C = d.cols.length;
  const svg = document.getElementById('patching-heatmap');
  const select = document.getElementById('patching-which');
  const range = document.getElementById('patching-range');
  const opt = (value, text) => { const o = document.createElement('option'); o.value = value; o.textContent = text; select.appendChild(o); };
  opt('mean', 'mean over examples');
  for (let e = 0; e < d.n_examples; e++) opt(String(e), 'example ' + e);
  const cell = 14, L = 48, T = 8, B = 110;
  const W = L + C * cell + 10, H = T + R * cell + B;
  svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  function colour(v, lim) {
    if (v === null || Number.isNaN(v)) return '#ddd';
    const t = Math.max(-1, Math.min(1, v / lim));
    const a = Math.abs(t), mix = (c) => Math.round(255 + (c - 255) * a);
    return t >= 0 ? `rgb(${mix(220)},${mix(38)},${mix(38)})` : `rgb(${mix(37)},${mix(99)},${mix(235)})`;
  }
  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const which = select.value;
    const off = which === 'mean' ? 0 : Number(which) * R * C;
    const src = which === 'mean' ? mean : all;
    let lim = 0;
    for (let i = 0; i < R * C; i++) { const v = src[off + i]; if (Number.isFinite(v)) lim = Math.max(lim, Math.abs(v)); }
    lim = lim || 1;
    range.textContent = `colour scale ±${MS.fmt(lim)} (red: positive, blue: negative)`;
    if (which !== 'mean') {
      const e = Number(which);
      range.textContent += ` · M(x) ${MS.fmt(d.metric_clean[e])}, M(x′) ${MS.fmt(d.metric_counterfactual[e])}`;
    }
    for (let r = 0; r < R; r++) {
      MS.el('text', {x: L - 4, y: T + r * cell + cell * 0.75, 'text-anchor': 'end'}, svg).textContent = d.rows[r];
      for (let c = 0; c < C; c++) {
        const v = src[off + r * C + c];
        const rect = MS.el('rect', {x: L + c * cell, y: T + r * cell, width: cell - 1, height: cell - 1,
                                     fill: colour(v, lim), class: 'cell'}, svg);
        rect.addEventListener('mousemove', (evt) => MS.tooltip(evt,
          `layer ${d.rows[r]}\n${d.axes.slice(1).join(' × ')} ${d.cols[c]}\nvalue ${MS.fmt(v)}`));
        rect.addEventListener('mouseleave', MS.hideTooltip);
      }
    }
    for (let c = 0; c < C; c++) {
      const x = L + c * cell + cell * 0.7, y = T + R * cell + 4;
      MS.el('text', {x: x, y: y, transform: `rotate(90 ${x} ${y})`}, svg).textContent = d.cols[c];
    }
    if (d.group) for (let k = d.group; k < C; k += d.group)
      MS.el('line', {x1: L + k * cell - 0.5, y1: T, x2: L + k * cell - 0.5, y2: T + R * cell, stroke: '#555'}, svg);
  }
  select.addEventListener('change', draw);
  draw();
})();
