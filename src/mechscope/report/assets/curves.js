// Faithfulness curves (normalized, soft, hard) against concrete token-level edges, log axis, one line
// per method. Data: MS.data('curves') = {curves: {method: [{concrete_edges, normalized, soft, hard}]}}.
(function () {
  const data = MS.data('curves');
  const COLORS = ['#2563eb', '#d97706', '#059669', '#7c3aed', '#dc2626', '#0891b2'];
  const methods = Object.keys(data.curves);
  function chart(svg, key, label) {
    const W = 400, H = 260, L = 46, R = 10, T = 18, B = 36;
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const ok = p => p.concrete_edges > 0 && p[key] !== null;
    const xs = [], ys = [];
    methods.forEach(m => data.curves[m].filter(ok).forEach(p => { xs.push(p.concrete_edges); ys.push(p[key]); }));
    if (!xs.length) return;
    const x0 = Math.log10(Math.min(...xs)), x1 = Math.log10(Math.max(...xs));
    const y0 = Math.min(0, ...ys), y1 = Math.max(1.05, ...ys);
    const X = v => L + (Math.log10(v) - x0) / Math.max(1e-9, x1 - x0) * (W - L - R);
    const Y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    const axis = MS.el('g', {class: 'axis'}, svg);
    MS.el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B}, axis);
    MS.el('line', {x1: L, y1: T, x2: L, y2: H - B}, axis);
    for (let d = Math.ceil(x0); d <= Math.floor(x1); d++) {
      MS.el('line', {x1: X(10 ** d), y1: H - B, x2: X(10 ** d), y2: H - B + 4}, axis);
      MS.el('text', {x: X(10 ** d), y: H - B + 15, 'text-anchor': 'middle'}, axis).textContent = '1e' + d;
    }
    [0, 0.5, 1].forEach(v => {
      MS.el('line', {x1: L - 4, y1: Y(v), x2: W - R, y2: Y(v), stroke: '#eef0f4'}, axis);
      MS.el('text', {x: L - 6, y: Y(v) + 4, 'text-anchor': 'end'}, axis).textContent = v;
    });
    MS.el('text', {x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle'}, svg).textContent = 'concrete token-level edges';
    MS.el('text', {x: L, y: 12}, svg).textContent = label;
    methods.forEach((m, i) => {
      const pts = data.curves[m].filter(ok), color = COLORS[i % COLORS.length];
      MS.el('path', {d: pts.map((p, j) => (j ? 'L' : 'M') + X(p.concrete_edges) + ' ' + Y(p[key])).join(' '),
                     stroke: color, 'stroke-width': 2, fill: 'none', class: 'curve'}, svg);
      pts.forEach(p => {
        const c = MS.el('circle', {cx: X(p.concrete_edges), cy: Y(p[key]), r: 3, fill: color}, svg);
        MS.el('title', {}, c).textContent = `${m}: ${MS.fmt(p.concrete_edges)} concrete edges, ${key} ${MS.fmt(p[key])}`;
      });
    });
  }
  const legend = document.getElementById('curve-legend');
  methods.forEach((m, i) => {
    const swatch = document.createElement('span');
    swatch.style.background = COLORS[i % COLORS.length];
    legend.appendChild(swatch);
    legend.appendChild(document.createTextNode(m));
  });
  chart(document.getElementById('curve-normalized'), 'normalized', 'normalized faithfulness');
  chart(document.getElementById('curve-soft'), 'soft', 'soft faithfulness');
  chart(document.getElementById('curve-hard'), 'hard', 'hard faithfulness');
})();
