// The circuit viewer: the span graph of the report's circuits drawn on a <canvas>.
// Data: contract B (section "circuit"). Edges arrive sorted by descending |score| as typed-array columns;
// every redraw is a single pass over them (filter, then aggregate into visible nodes) and the canvas is
// painted with one path per colour and width bucket, so no DOM element exists per edge or node.
(function () {
  'use strict';
  const startMs = performance.now();   // since navigation start: the page is loaded and parsed up to here
  const P = MS.data('circuit');
  const $ = id => document.getElementById(id);
  const KINDS = ['within', 'k', 'v', 'q'];
  const NODE_KINDS = ['input', 'head', 'mlp', 'q', 'k', 'v', 'logits'];
  const NODE_COLOR = ['#111827', '#7c3aed', '#059669', '#f59e0b', '#0ea5e9', '#ec4899', '#111827'];
  const GROUP_COLOR = '#4c1d95';
  const EDGE_COLOR = ['#2563eb', '#dc2626', '#9aa3b5'];   // positive, negative, no score
  const CAP = 20000;             // most edges drawn one by one
  const AGG_ABOVE = 3000;        // circuits with more edges open aggregated
  const WIDTH_BUCKETS = 6;

  // ---- data ----
  const E = P.edges, nE = E.n;
  const eParent = MS.column(E.parent), eChild = MS.column(E.child), eKind = MS.column(E.kind);
  const eKeySpan = MS.column(E.key_span), eScore = MS.column(E.score), eConc = MS.column(E.concrete);
  const eMember = MS.column(E.member);
  const nodes = P.nodes, N = nodes.name.length;
  const nKind = Int8Array.from(nodes.kind), nLayer = Int16Array.from(nodes.layer);
  const nIndex = Int16Array.from(nodes.index), nSpan = Int16Array.from(nodes.span);
  const spans = P.spans, S = spans.length, L = P.n_layers, H = P.n_heads, KV = P.n_kv_heads;
  const shortName = nodes.name.map(n => n.replace(/@[^@]*$/, ''));
  const decodeMs = performance.now() - startMs;

  // ---- groups: level 1 = a layer's heads and q/k/v in one span ("a7@S"); level 2 = across spans ----
  // Visible ids: [0, N) nodes, [N, N + G1) level-1 groups, [N + G1, N + G1 + G2) level-2 groups.
  const G1 = S * L, G2 = 2 * L + 2, V = N + G1 + G2;
  const g1Of = new Int32Array(N).fill(-1), g2Of = new Int32Array(N);
  for (let i = 0; i < N; i++) {
    const k = nKind[i], l = nLayer[i];
    if (k === 1 || k >= 3 && k <= 5) { g1Of[i] = nSpan[i] * L + l; g2Of[i] = 1 + 2 * l; }
    else if (k === 2) g2Of[i] = 2 + 2 * l;
    else g2Of[i] = k === 0 ? 0 : G2 - 1;
  }
  const vName = new Array(V), vKind = new Int8Array(V);   // vKind: node kind, 7 = layer group, 8 = span group
  for (let i = 0; i < N; i++) { vName[i] = nodes.name[i]; vKind[i] = nKind[i]; }
  for (let s = 0; s < S; s++) for (let l = 0; l < L; l++) { vName[N + s * L + l] = `a${l}@${spans[s]}`; vKind[N + s * L + l] = 7; }
  for (let g = 0; g < G2; g++) {
    vName[N + G1 + g] = g === 0 ? 'input' : g === G2 - 1 ? 'logits' : (g % 2 ? 'a' : 'm') + ((g - 1) >> 1);
    vKind[N + G1 + g] = 8;
  }
  const vShort = vName.map(n => n.replace(/@[^@]*$/, ''));   // labels: the column names the span

  // ---- layout (CSS pixels of the canvas at zoom 1) ----
  const vx = new Float32Array(V), vy = new Float32Array(V);
  const M = {left: 58, right: 10, top: 10, bottom: 30};
  let W = 800, Hc = 600, colW = 1, rowH = 1, headDx = 1;
  function layout() {
    colW = (W - M.left - M.right) / S;
    rowH = (Hc - M.top - M.bottom) / (L + 2);
    headDx = colW * 0.74 / H;
    const rowY = l => Hc - M.bottom - (l + 1.5) * rowH;   // l = -1 input ... L logits
    const headX = (s, h) => M.left + s * colW + colW * 0.05 + headDx * (h + 0.5);
    const perGroup = H / KV;
    for (let i = 0; i < N; i++) {
      const s = nSpan[i], l = nLayer[i], k = nKind[i], j = nIndex[i];
      let x, y = rowY(l);
      if (k === 0 || k === 6) x = M.left + (s + 0.42) * colW;
      else if (k === 2) x = M.left + s * colW + colW * 0.9;
      else if (k === 1 || k === 3) x = headX(s, j);
      else x = headX(s, (j + 0.5) * perGroup - 0.5) + (k === 4 ? -0.3 : 0.3) * headDx;
      if (k === 1) y -= rowH * 0.12;
      if (k >= 3 && k <= 5) y += rowH * 0.3;
      vx[i] = x; vy[i] = y;
    }
    const sx = new Float64Array(G1 + G2), sy = new Float64Array(G1 + G2), c = new Float64Array(G1 + G2);
    for (let i = 0; i < N; i++) {
      if (nKind[i] >= 3 && nKind[i] <= 5) continue;   // place groups by their head / output nodes
      const g = g1Of[i];
      if (g >= 0) { sx[g] += vx[i]; sy[g] += vy[i]; c[g]++; }
      const g2 = G1 + g2Of[i];
      sx[g2] += vx[i]; sy[g2] += vy[i]; c[g2]++;
    }
    for (let g = 0; g < G1 + G2; g++) { vx[N + g] = c[g] ? sx[g] / c[g] : 0; vy[N + g] = c[g] ? sy[g] / c[g] : 0; }
  }

  // ---- state ----
  const st = {
    circuit: P.default, mode: null, autoMode: true, kinds: [true, true, true, true], sign: 'both',
    threshold: 0, search: '', pinned: -1, expanded: new Set(), scale: 1, tx: 0, ty: 0,
    denseMax: 1 << 22,   // largest dense table of visible node pairs (entries); above it a hash
  };
  const vis = new Int32Array(N);
  const touched = new Uint8Array(N);   // nodes with an edge that passes the filters (drawn or inside a group)
  // drawn edges (filled by compute)
  let dN = 0, capped = false, nPassing = 0;
  const dP = new Int32Array(CAP), dC = new Int32Array(CAP), dScore = new Float64Array(CAP);
  const dConc = new Float64Array(CAP), dCount = new Int32Array(CAP), dKinds = new Uint8Array(CAP);
  const dFirst = new Int32Array(CAP);
  let drawnNodes = new Int32Array(0), nodeOn = new Uint8Array(V), maxAbs = 1e-30;
  let highlight = null, matches = [];
  const timings = {};

  function circuitSize(i) { return P.circuits.length ? P.circuits[i].n_edges : nE; }
  function chooseMode() { return circuitSize(st.circuit) > AGG_ABOVE ? 'layers' : 'heads'; }

  function visibleOf(i) {
    if (st.mode === 'heads') return i;
    const g1 = g1Of[i];
    if (st.mode === 'spans' && !st.expanded.has(N + G1 + g2Of[i])) return N + G1 + g2Of[i];
    if (g1 < 0 || st.expanded.has(N + g1)) return i;
    return N + g1;
  }

  // A threshold slider position (0..1000, log scale) as an |score| value; 0 = no threshold.
  let absLo = 1e-12, absHi = 1;
  (function () {
    let lo = Infinity, hi = 0;
    for (let i = 0; i < nE; i++) { const a = Math.abs(eScore[i]); if (a > 0 && a < lo) lo = a; if (a > hi) hi = a; }
    if (hi > 0) { absHi = hi; absLo = Math.max(lo, hi * 1e-8); }
  })();
  function thresholdOf(pos) { return pos <= 0 ? 0 : Math.exp(Math.log(absLo) + pos / 1000 * (Math.log(absHi) - Math.log(absLo))); }

  // Aggregated edges: every edge's row in `agg` (its visible parent and child), computed once per view
  // (mode and expanded nodes) through an open-addressing hash; -1 = inside one collapsed node.
  let pairOf = null, nPairs = 0, pairsFor = '';
  const agg = {cap: 0};
  function aggGrow(need) {
    let cap = Math.max(4096, agg.cap);
    while (cap < need) cap *= 2;
    if (cap === agg.cap) return;
    const grow = (T, old) => { const a = new T(cap); if (old) a.set(old.subarray(0, Math.min(old.length, cap))); return a; };
    agg.p = grow(Int32Array, agg.p); agg.c = grow(Int32Array, agg.c); agg.s = new Float64Array(cap);
    agg.scored = new Uint8Array(cap); agg.conc = new Float64Array(cap); agg.count = new Int32Array(cap);
    agg.kinds = new Uint8Array(cap); agg.first = new Int32Array(cap); agg.cap = cap;
  }
  function pairs() {
    const key = st.mode + '|' + st.denseMax + '|' + [...st.expanded].sort().join(',');
    if (key === pairsFor) return;
    pairsFor = key;
    if (!pairOf) pairOf = new Int32Array(nE);
    // Visible nodes numbered 0..U-1; a dense U x U table when it is small, else a hash.
    const compact = new Int32Array(V).fill(-1);
    let U = 0;
    for (let i = 0; i < N; i++) if (compact[vis[i]] < 0) compact[vis[i]] = U++;
    const dense = U * U <= st.denseMax;
    let size = dense ? U * U : 1 << 15;
    let keys = new Int32Array(size).fill(-1), vals = new Int32Array(dense ? 0 : size), mask = size - 1, n = 0;
    for (let i = 0; i < nE; i++) {
      const p = vis[eParent[i]], c = vis[eChild[i]];
      if (p === c) { pairOf[i] = -1; continue; }
      const k = compact[p] * U + compact[c];
      if (dense) {
        const j = keys[k];
        if (j >= 0) { pairOf[i] = j; continue; }
        keys[k] = n;
      } else {
        let h = Math.imul(k, 0x9E3779B1) >>> 0 & mask;
        while (keys[h] !== -1 && keys[h] !== k) h = (h + 1) & mask;
        if (keys[h] === k) { pairOf[i] = vals[h]; continue; }
        keys[h] = k; vals[h] = n;
        if (2 * (n + 1) > size) {   // grow the table and re-insert
          const ok = keys, ov = vals;
          size *= 2; keys = new Int32Array(size).fill(-1); vals = new Int32Array(size); mask = size - 1;
          for (let j = 0; j < ok.length; j++) if (ok[j] !== -1) {
            let g = Math.imul(ok[j], 0x9E3779B1) >>> 0 & mask;
            while (keys[g] !== -1) g = (g + 1) & mask;
            keys[g] = ok[j]; vals[g] = ov[j];
          }
        }
      }
      pairOf[i] = n;
      if (n >= agg.cap) aggGrow(n + 1);
      agg.p[n] = p; agg.c[n] = c; n++;
    }
    nPairs = n;
  }

  // One pass over the edges: the circuit's edges that pass the filters, summed into visible node pairs.
  function compute() {
    if (!st.mode) st.mode = chooseMode();
    for (let i = 0; i < N; i++) vis[i] = visibleOf(i);
    const bit = P.circuits.length ? (1 << st.circuit) >>> 0 : 0;
    const kindMask = st.kinds.reduce((m, on, k) => m | (on ? 1 << k : 0), 0);
    const sign = st.sign === 'positive' ? 1 : st.sign === 'negative' ? -1 : 0, thr = st.threshold;
    const single = st.mode === 'heads';
    let n = 0, passing = 0, over = false;
    touched.fill(0);
    if (!single) {
      const tp = performance.now();
      pairs();
      api.pairsMs = performance.now() - tp;
      agg.s.fill(0, 0, nPairs); agg.scored.fill(0, 0, nPairs); agg.conc.fill(0, 0, nPairs);
      agg.count.fill(0, 0, nPairs); agg.kinds.fill(0, 0, nPairs);
    }
    for (let i = 0; i < nE; i++) {
      if (bit && !(eMember[i] & bit)) continue;
      const k = eKind[i];
      if (!(kindMask & (1 << k))) continue;
      const s = eScore[i];
      if (s !== s) { if (sign !== 0 || thr > 0) continue; }
      else {
        if (sign > 0 ? s <= 0 : sign < 0 ? s >= 0 : false) continue;
        if (thr > 0 && Math.abs(s) < thr) continue;
      }
      if (single) {
        const p = vis[eParent[i]], c = vis[eChild[i]];
        passing++;
        if (n >= CAP) { over = true; continue; }
        dP[n] = p; dC[n] = c; dScore[n] = s; dConc[n] = eConc[i]; dCount[n] = 1; dKinds[n] = 1 << k; dFirst[n] = i; n++;
        continue;
      }
      touched[eParent[i]] = 1; touched[eChild[i]] = 1;
      const j = pairOf[i];
      if (j < 0) continue;   // inside one collapsed node
      passing++;
      if (agg.count[j] === 0) agg.first[j] = i;
      if (s === s) { agg.s[j] += s; agg.scored[j] = 1; }
      const cc = eConc[i];
      if (cc === cc) agg.conc[j] += cc;
      agg.count[j]++; agg.kinds[j] |= 1 << k;
    }
    if (!single) {
      const used = [];
      for (let j = 0; j < nPairs; j++) if (agg.count[j]) used.push(j);
      let order = used;
      if (used.length > CAP) {
        over = true;
        const absSum = j => agg.scored[j] ? Math.abs(agg.s[j]) : -1;
        order = used.sort((a, b) => absSum(b) - absSum(a)).slice(0, CAP);
      }
      n = order.length;
      for (let t = 0; t < n; t++) {
        const j = order[t];
        dP[t] = agg.p[j]; dC[t] = agg.c[j]; dScore[t] = agg.scored[j] ? agg.s[j] : NaN; dConc[t] = agg.conc[j];
        dCount[t] = agg.count[j]; dKinds[t] = agg.kinds[j]; dFirst[t] = agg.first[j];
      }
    }
    dN = n; capped = over; nPassing = passing;
    nodeOn = new Uint8Array(V);
    maxAbs = 1e-30;
    for (let t = 0; t < n; t++) {
      nodeOn[dP[t]] = 1; nodeOn[dC[t]] = 1;
      const a = Math.abs(dScore[t]); if (a > maxAbs) maxAbs = a;
    }
    if (st.pinned >= 0 && !nodeOn[st.pinned]) st.pinned = -1;
    const list = [];
    for (let v = 0; v < V; v++) if (nodeOn[v]) list.push(v);
    drawnNodes = Int32Array.from(list);
    computeHighlight();
    computeMatches();
  }

  // Ancestors and descendants of the pinned node along the drawn edges (adjacency in typed arrays).
  function computeHighlight() {
    highlight = null;
    if (st.pinned < 0) return;
    const walk = (from, to) => {
      const start = new Int32Array(V + 1), next = new Int32Array(dN);
      for (let t = 0; t < dN; t++) start[from[t] + 1]++;
      for (let v = 0; v < V; v++) start[v + 1] += start[v];
      const fill = start.slice(0, V);
      for (let t = 0; t < dN; t++) next[fill[from[t]]++] = to[t];
      const seen = new Uint8Array(V), stack = [st.pinned];
      seen[st.pinned] = 1;
      while (stack.length) {
        const v = stack.pop();
        for (let j = start[v]; j < start[v + 1]; j++) if (!seen[next[j]]) { seen[next[j]] = 1; stack.push(next[j]); }
      }
      return seen;
    };
    const desc = walk(dP, dC), anc = walk(dC, dP);
    const edge = new Uint8Array(dN);
    let nEdges = 0, nNodes = 0;
    for (let t = 0; t < dN; t++) if ((anc[dP[t]] && anc[dC[t]]) || (desc[dP[t]] && desc[dC[t]])) { edge[t] = 1; nEdges++; }
    for (let v = 0; v < V; v++) if (anc[v] || desc[v]) nNodes++;
    highlight = {anc, desc, edge, nEdges, nNodes};
  }

  function computeMatches() {
    matches = [];
    const q = st.search.trim();
    if (!q) return;
    const hit = new Uint8Array(V);
    for (let i = 0; i < N; i++) {
      if (shortName[i] !== q && nodes.name[i] !== q) continue;
      if (st.mode !== 'heads' && !touched[i]) continue;   // a group matches when the node is in the circuit
      const v = vis[i];
      if (nodeOn[v]) hit[v] = 1;
    }
    for (let v = N; v < V; v++) if (nodeOn[v] && vName[v] === q) hit[v] = 1;
    for (let v = 0; v < V; v++) if (hit[v]) matches.push(v);
  }

  // ---- canvas ----
  const wrap = $('cv-wrap'), canvas = $('cv-canvas'), ctx = canvas.getContext('2d');
  let dpr = 1;
  function resize() {
    dpr = window.devicePixelRatio || 1;
    W = Math.max(320, wrap.clientWidth);
    Hc = Math.round(Math.min(1000, Math.max(420, window.innerHeight - 140)));   // the window's height, less the controls
    canvas.style.width = W + 'px'; canvas.style.height = Hc + 'px';
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(Hc * dpr);
    layout();
  }
  const X = v => vx[v] * st.scale + st.tx, Y = v => vy[v] * st.scale + st.ty;

  function nodeRadius(v) { const k = vKind[v]; return k >= 7 ? 6 : k === 0 || k === 6 ? 5 : k >= 3 ? 2.2 : 3.4; }

  function draw() {
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = '#fcfdff'; ctx.fillRect(0, 0, W, Hc);
    const sc = st.scale;
    // span columns and their labels
    ctx.font = '11px system-ui, sans-serif'; ctx.textBaseline = 'middle';
    for (let s = 0; s < S; s++) {
      const x0 = (M.left + s * colW) * sc + st.tx;
      if (s % 2) { ctx.fillStyle = '#f2f4f8'; ctx.fillRect(x0, 0, colW * sc, Hc - M.bottom + 4); }
    }
    // edges, thin first; dimmed when a node is pinned and the edge is off its paths
    const hl = highlight;
    const paths = new Map();
    for (let t = dN - 1; t >= 0; t--) {
      const s = dScore[t], a = Math.abs(s);
      const color = s !== s ? 2 : s >= 0 ? 0 : 1;
      const b = s !== s ? 0 : Math.min(WIDTH_BUCKETS - 1, Math.floor(a / maxAbs * WIDTH_BUCKETS));
      const dim = hl && !hl.edge[t] ? 1 : 0;
      const key = (dim * WIDTH_BUCKETS + b) * 3 + color;
      let p = paths.get(key);
      if (!p) { p = new Path2D(); paths.set(key, p); }
      const x1 = X(dP[t]), y1 = Y(dP[t]), x2 = X(dC[t]), y2 = Y(dC[t]);
      const bend = dKinds[t] & 1 ? 0.12 : -0.2;
      p.moveTo(x1, y1);
      p.quadraticCurveTo((x1 + x2) / 2 - (y2 - y1) * bend, (y1 + y2) / 2 + (x2 - x1) * bend, x2, y2);
    }
    const alpha = Math.min(0.85, Math.max(0.12, Math.sqrt(1500 / Math.max(1, dN))));
    [...paths.keys()].sort((a, b) => (b >= WIDTH_BUCKETS * 3) - (a >= WIDTH_BUCKETS * 3) || a - b)
      .forEach(key => {
        const color = key % 3, b = Math.floor(key / 3) % WIDTH_BUCKETS, dim = key >= WIDTH_BUCKETS * 3;
        ctx.strokeStyle = EDGE_COLOR[color];
        ctx.globalAlpha = dim ? 0.06 : hl ? 0.9 : alpha + (1 - alpha) * b / WIDTH_BUCKETS;
        ctx.lineWidth = 0.5 + b * 0.8;
        ctx.stroke(paths.get(key));
      });
    ctx.globalAlpha = 1;
    // nodes, batched by kind
    const byKind = new Map();
    for (const v of drawnNodes) {
      const k = vKind[v], dim = hl && !hl.anc[v] && !hl.desc[v] ? 1 : 0;
      const key = k * 2 + dim;
      let p = byKind.get(key);
      if (!p) { p = new Path2D(); byKind.set(key, p); }
      const x = X(v), y = Y(v), r = nodeRadius(v);
      if (x < -10 || x > W + 10 || y < -10 || y > Hc + 10) continue;
      p.moveTo(x + r, y); p.arc(x, y, r, 0, 2 * Math.PI);
    }
    for (const [key, p] of byKind) {
      const k = key >> 1;
      ctx.globalAlpha = key & 1 ? 0.2 : 1;
      ctx.fillStyle = k >= 7 ? GROUP_COLOR : NODE_COLOR[k];
      ctx.fill(p);
    }
    ctx.globalAlpha = 1;
    // rings: search matches (orange), the pinned node (black)
    ctx.lineWidth = 2.5; ctx.strokeStyle = '#f97316';
    for (const v of matches) { ctx.beginPath(); ctx.arc(X(v), Y(v), nodeRadius(v) + 5, 0, 2 * Math.PI); ctx.stroke(); }
    if (st.pinned >= 0) { ctx.strokeStyle = '#111'; ctx.beginPath(); ctx.arc(X(st.pinned), Y(st.pinned), nodeRadius(st.pinned) + 3, 0, 2 * Math.PI); ctx.stroke(); }
    // labels: always for groups, for single nodes when the zoom leaves room
    ctx.fillStyle = '#1d2330';
    const room = headDx * sc;
    const few = drawnNodes.length <= 80;  // a small circuit: name every head even when they sit close
    for (const v of drawnNodes) {
      const k = vKind[v];
      const show = k >= 7 || (k === 0 || k === 6 || k === 2 ? room > 14 || st.mode !== 'heads' : k === 1 ? room > 30 || few : room > 110);
      if (!show && v !== st.pinned && !(matches.length && matches.includes(v))) continue;
      const x = X(v), y = Y(v);
      if (x < -20 || x > W + 20 || y < -10 || y > Hc + 10) continue;
      // groups: left of the node, MLPs: right of it (rows stay readable when layers are close); others above
      if (k === 7 || k === 8) { ctx.textAlign = 'right'; ctx.textBaseline = 'middle'; ctx.fillText(vShort[v], x - nodeRadius(v) - 2, y); }
      else if (k === 2) { ctx.textAlign = 'left'; ctx.textBaseline = 'middle'; ctx.fillText(vShort[v], x + nodeRadius(v) + 2, y); }
      else { ctx.textAlign = 'center'; ctx.textBaseline = 'bottom'; ctx.fillText(vShort[v], x, y - nodeRadius(v) - 1); }
    }
    // axes: layers on the left, spans at the bottom (drawn last, over the edges)
    ctx.fillStyle = '#fcfdff'; ctx.fillRect(0, 0, M.left - 6, Hc); ctx.fillRect(0, Hc - M.bottom + 4, W, M.bottom);
    ctx.fillStyle = '#3a4256'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    const every = Math.max(1, Math.ceil(14 / (rowH * sc)));
    for (let l = -1; l <= L; l++) {
      if (l >= 0 && l < L && l % every) continue;
      const y = (Hc - M.bottom - (l + 1.5) * rowH) * sc + st.ty;
      if (y < 6 || y > Hc - M.bottom) continue;
      ctx.fillText(l < 0 ? 'input' : l === L ? 'logits' : 'L' + l, M.left - 10, y);
    }
    ctx.save(); ctx.translate(12, Hc / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = 'center'; ctx.fillText('layer', 0, 0); ctx.restore();
    ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
    for (let s = 0; s < S; s++) {
      const x = (M.left + (s + 0.5) * colW) * sc + st.tx;
      if (x > M.left - 20 && x < W + 20) ctx.fillText(spans[s], x, Hc - M.bottom / 2 + 2);
    }
  }

  // ---- status line, size info ----
  const statusEl = $('cv-status');
  function fmtInt(x) { return x === null || x === undefined ? 'n/a' : Math.round(x).toLocaleString('en-US'); }
  function status() {
    const c = P.circuits[st.circuit];
    const modeText = {heads: 'every head its own node', layers: "a layer's heads and their q/k/v inputs in one span as one node (a7@S)",
                      spans: 'a layer across all spans as one node (a7, m7)'}[st.mode];
    let text = `${fmtInt(dN)} edges drawn (${fmtInt(nPassing)} circuit edges pass the filters), ${fmtInt(drawnNodes.length)} nodes · view: ${st.mode} — ${modeText}`;
    if (st.autoMode) text += ` (chosen for a circuit of ${fmtInt(circuitSize(st.circuit))} edges: aggregated above ${fmtInt(AGG_ABOVE)})`;
    if (capped) text += ` · only the ${fmtInt(CAP)} largest by |score| drawn`;
    if (highlight) text += ` · pinned ${vName[st.pinned]}: ${fmtInt(highlight.nNodes)} nodes on its paths (Esc to unpin)`;
    if (st.search.trim()) text += ` · ${matches.length} match${matches.length === 1 ? '' : 'es'} for “${st.search.trim()}”`;
    statusEl.textContent = text;
    Object.assign(statusEl.dataset, {
      edges: dN, nodes: drawnNodes.length, passing: nPassing, mode: st.mode, circuit: st.circuit, capped: capped ? 1 : 0,
      pinned: st.pinned >= 0 ? vName[st.pinned] : '', matches: matches.length,
      highlighted: highlight ? highlight.nEdges : 0,
    });
    if (c) $('cv-size-info').textContent = sizeText(c);
  }
  const concreteSums = {};
  function concreteOf(i) {   // the payload's count, else the sum over the circuit's edges (NaN: unknown)
    const c = P.circuits[i];
    if (c.concrete_edges !== null && c.concrete_edges !== undefined) return c.concrete_edges;
    if (!(i in concreteSums)) {
      const bit = (1 << i) >>> 0;
      let sum = 0, known = 0;
      for (let j = 0; j < nE; j++) if (eMember[j] & bit) { const x = eConc[j]; if (x === x) { sum += x; known++; } }
      concreteSums[i] = known ? sum : null;
    }
    return concreteSums[i];
  }
  function sizeText(c) {
    const f = x => x === null || x === undefined ? 'n/a' : x.toFixed(3);
    return `${fmtInt(c.n_edges)} span edges · ${fmtInt(concreteOf(P.circuits.indexOf(c)))} concrete edges per example · faithfulness normalized ${f(c.normalized)}, soft ${f(c.soft)}, hard ${f(c.hard)}${c.saved ? ' · ★ saved circuit' : ''}`;
  }

  // Every interaction goes through here: recompute (if the shown set changed), redraw, time it.
  function update(name, recompute) {
    const t = performance.now();
    if (recompute) compute();
    const t1 = performance.now();
    draw();
    status();
    const ms = performance.now() - t;
    api.computeMs = t1 - t; api.drawMs = ms - (t1 - t);
    api.renderMs = ms; timings[name] = ms; api.renders++;
    statusEl.dataset.renderMs = ms.toFixed(1);
  }

  // ---- controls ----
  const sizeEl = $('cv-size'), selectEl = $('cv-select'), modeEl = $('cv-mode');
  sizeEl.max = Math.max(0, P.circuits.length - 1);
  P.circuits.forEach((c, i) => {
    const o = document.createElement('option');
    o.value = i; o.textContent = `${c.label}${c.saved ? ' ★' : ''}`;
    selectEl.appendChild(o);
  });
  function selectCircuit(i) {
    st.circuit = Math.max(0, Math.min(P.circuits.length - 1, i | 0));
    sizeEl.value = st.circuit; selectEl.value = st.circuit;
    if (st.autoMode) { st.mode = chooseMode(); modeEl.value = st.mode; st.expanded.clear(); }
    update('slider', true);
  }
  sizeEl.addEventListener('input', () => selectCircuit(+sizeEl.value));
  selectEl.addEventListener('change', () => selectCircuit(+selectEl.value));
  function setMode(m) {
    st.mode = m; st.autoMode = false; modeEl.value = m; st.expanded.clear(); st.pinned = -1;
    update('mode', true);
  }
  modeEl.addEventListener('change', () => setMode(modeEl.value));
  KINDS.forEach((k, i) => $('cv-kind-' + k).addEventListener('change', e => { st.kinds[i] = e.target.checked; update('filter', true); }));
  $('cv-sign').addEventListener('change', e => { st.sign = e.target.value; update('sign', true); });
  const thrEl = $('cv-threshold'), thrText = $('cv-threshold-value');
  function setThreshold(value) {
    st.threshold = value;
    thrText.textContent = value > 0 ? MS.fmt(value) : 'off';
    update('threshold', true);
  }
  thrEl.addEventListener('input', () => setThreshold(thresholdOf(+thrEl.value)));
  function search(q) {
    st.search = q;
    const t = performance.now();
    computeMatches();
    if (matches.length) {   // centre the matches
      let sx = 0, sy = 0;
      for (const v of matches) { sx += vx[v]; sy += vy[v]; }
      st.tx = W / 2 - sx / matches.length * st.scale; st.ty = Hc / 2 - sy / matches.length * st.scale;
    }
    update('search', false);
    timings.search = api.renderMs = performance.now() - t;
  }
  $('cv-search').addEventListener('input', e => search(e.target.value));
  function resetView() { st.scale = 1; st.tx = 0; st.ty = 0; update('reset', false); }
  $('cv-reset').addEventListener('click', resetView);
  $('cv-collapse').addEventListener('click', () => { st.expanded.clear(); update('collapse', true); });

  // ---- mouse: hover tooltips, click (pin / expand), drag (pan), wheel (zoom) ----
  function nodeAt(mx, my) {
    let best = -1, bd = Infinity;
    for (const v of drawnNodes) {
      const dx = X(v) - mx, dy = Y(v) - my, d = dx * dx + dy * dy, r = nodeRadius(v) + 4;
      if (d < r * r && d < bd) { bd = d; best = v; }
    }
    return best;
  }
  function edgeAt(mx, my) {
    let best = -1, bd = 16;   // within 4 px
    for (let t = 0; t < dN; t++) {
      const x1 = X(dP[t]), y1 = Y(dP[t]), x2 = X(dC[t]), y2 = Y(dC[t]);
      const bend = dKinds[t] & 1 ? 0.12 : -0.2;
      const cx = (x1 + x2) / 2 - (y2 - y1) * bend, cy = (y1 + y2) / 2 + (x2 - x1) * bend;
      if (mx < Math.min(x1, x2, cx) - 4 || mx > Math.max(x1, x2, cx) + 4 || my < Math.min(y1, y2, cy) - 4 || my > Math.max(y1, y2, cy) + 4) continue;
      let px = x1, py = y1;
      for (let j = 1; j <= 8; j++) {
        const u = j / 8, a = (1 - u) * (1 - u), b = 2 * u * (1 - u), c = u * u;
        const qx = a * x1 + b * cx + c * x2, qy = a * y1 + b * cy + c * y2;
        const ex = qx - px, ey = qy - py, len = ex * ex + ey * ey || 1;
        const w = Math.max(0, Math.min(1, ((mx - px) * ex + (my - py) * ey) / len));
        const dx = px + w * ex - mx, dy = py + w * ey - my, d = dx * dx + dy * dy;
        if (d < bd) { bd = d; best = t; }
        px = qx; py = qy;
      }
    }
    return best;
  }
  function nodeText(v) {
    const k = vKind[v];
    const what = k === 7 ? `layer ${vName[v].split('@')[0].slice(1)} attention (heads and their q/k/v inputs) at span ${vName[v].split('@')[1]}; click to expand`
      : k === 8 ? 'this node in all spans together; click to expand into spans'
      : `${NODE_KINDS[k]}${nLayer[v] >= 0 && nLayer[v] < L ? ' · layer ' + nLayer[v] : ''} · span ${spans[nSpan[v]]}`;
    let deg = 0;
    for (let t = 0; t < dN; t++) if (dP[t] === v || dC[t] === v) deg++;
    return `${vName[v]}\n${what}\n${deg} drawn edges`;
  }
  function edgeText(t) {
    const kinds = KINDS.filter((_, i) => dKinds[t] & (1 << i)).join('+');
    let text = `${vName[dP[t]]} → ${vName[dC[t]]}\ntype ${kinds} · score ${MS.fmt(dScore[t])} · concrete edges ${MS.fmt(dConc[t])}`;
    if (dCount[t] > 1) text += `\nsum of ${dCount[t].toLocaleString('en-US')} span edges`;
    else if (eKeySpan[dFirst[t]] >= 0 && eKind[dFirst[t]] !== 0) text += `\nkey span ${spans[eKeySpan[dFirst[t]]]}`;
    return text;
  }
  let drag = null, hoverFrame = 0;
  const local = evt => { const r = canvas.getBoundingClientRect(); return [evt.clientX - r.left, evt.clientY - r.top]; };
  canvas.addEventListener('mousedown', evt => { const [x, y] = local(evt); drag = {x, y, tx: st.tx, ty: st.ty, moved: false}; });
  window.addEventListener('mouseup', evt => {
    if (!drag) return;
    const d = drag; drag = null;
    if (d.moved) return;
    const [x, y] = local(evt);
    click(nodeAt(x, y), evt.shiftKey);
  });
  canvas.addEventListener('mousemove', evt => {
    const [x, y] = local(evt);
    if (drag) {
      if (Math.abs(x - drag.x) + Math.abs(y - drag.y) > 3) drag.moved = true;
      if (drag.moved) { st.tx = drag.tx + x - drag.x; st.ty = drag.ty + y - drag.y; requestDraw('pan'); }
      return;
    }
    if (hoverFrame) return;
    hoverFrame = requestAnimationFrame(() => {
      hoverFrame = 0;
      const v = nodeAt(x, y);
      if (v >= 0) { MS.tooltip(evt, nodeText(v)); canvas.style.cursor = 'pointer'; return; }
      const t = edgeAt(x, y);
      canvas.style.cursor = t >= 0 ? 'help' : 'grab';
      if (t >= 0) MS.tooltip(evt, edgeText(t)); else MS.hideTooltip();
    });
  });
  canvas.addEventListener('mouseleave', () => MS.hideTooltip());
  let drawFrame = 0, drawName = '';
  function requestDraw(name) {
    drawName = name;
    if (!drawFrame) drawFrame = requestAnimationFrame(() => { drawFrame = 0; update(drawName, false); });
  }
  function zoom(factor, mx, my) {
    const s = Math.max(0.5, Math.min(60, st.scale * factor)), f = s / st.scale;
    st.tx = mx - (mx - st.tx) * f; st.ty = my - (my - st.ty) * f; st.scale = s;
  }
  canvas.addEventListener('wheel', evt => {
    evt.preventDefault();
    const [x, y] = local(evt);
    zoom(Math.exp(-evt.deltaY * 0.0015), x, y);
    requestDraw('zoom');
  }, {passive: false});
  function click(v, shift) {
    if (v < 0) { if (st.pinned >= 0) unpin(); return; }
    if (shift && v < N) {   // collapse the group this node was expanded from
      const g = g1Of[v] >= 0 && st.expanded.has(N + g1Of[v]) ? N + g1Of[v] : N + G1 + g2Of[v];
      if (st.expanded.delete(g)) { update('collapse', true); return; }
    }
    if (shift && v >= N && v < N + G1 && st.expanded.delete(N + G1 + 1 + 2 * ((v - N) % L))) { update('collapse', true); return; }
    if (v >= N) { st.expanded.add(v); st.pinned = -1; update('expand', true); return; }
    st.pinned = v; computeHighlight(); update('pin', false);
    if (vKind[v] === 1) window.dispatchEvent(new CustomEvent('ms-head', {detail: shortName[v]}));
  }
  function unpin() { st.pinned = -1; computeHighlight(); update('unpin', false); }
  window.addEventListener('keydown', evt => { if (evt.key === 'Escape' && st.pinned >= 0) unpin(); });

  // ---- legend ----
  const legend = $('cv-legend');
  const item = (html) => legend.insertAdjacentHTML('beforeend', `<span class="cv-item">${html}</span>`);
  [['input / logits', 0], ['head output', 1], ['MLP', 2], ['query input', 3], ['key input', 4], ['value input', 5]].forEach(([t, k]) =>
    item(`<i class="cv-dot" style="background:${NODE_COLOR[k]}"></i>${t}`));
  item(`<i class="cv-dot cv-big" style="background:${GROUP_COLOR}"></i>aggregated node (click to expand, shift-click to collapse)`);
  [['positive', 0], ['negative', 1], ['no score', 2]].forEach(([t, c]) => item(`<i class="cv-line" style="background:${EDGE_COLOR[c]}"></i>${t}`));
  item('line width ∝ |score|; click a node to pin its paths, drag to pan, wheel to zoom');

  // ---- test and tooling hooks ----
  const api = {
    renderMs: NaN, renders: 0, timings, state: st, firstDrawMs: NaN, startMs, decodeMs,
    select: selectCircuit, setMode, search, resetView,
    setKind(kind, on) { st.kinds[KINDS.indexOf(kind)] = on; $('cv-kind-' + kind).checked = on; update('filter', true); },
    setSign(sign) { $('cv-sign').value = sign; st.sign = sign; update('sign', true); },
    setThreshold(value) { setThreshold(value); },
    pin(name) { const v = vName.indexOf(name); if (v < 0 || !nodeOn[v]) return false; click(v, false); return true; },
    unpin,
    expand(name) { const v = vName.indexOf(name); if (v < N || !nodeOn[v]) return false; click(v, false); return true; },
    collapse(name) { const v = vName.indexOf(name); if (!st.expanded.delete(v)) return false; update('collapse', true); return true; },
    zoom(factor) { zoom(factor, W / 2, Hc / 2); update('zoom', false); },
    drawnNodes: () => Array.from(drawnNodes, v => vName[v]),
    drawnEdges: () => Array.from({length: dN}, (_, t) => [vName[dP[t]], vName[dC[t]],
      dCount[t] === 1 && st.mode === 'heads' && eKeySpan[dFirst[t]] >= 0 ? spans[eKeySpan[dFirst[t]]] : null, dScore[t], dCount[t]]),
    highlighted: () => highlight ? Array.from({length: dN}, (_, t) => t).filter(t => highlight.edge[t]).map(t => [vName[dP[t]], vName[dC[t]]]) : [],
    matches: () => matches.map(v => vName[v]),
    screenOf(name) { const v = vName.indexOf(name); const r = canvas.getBoundingClientRect(); return [r.left + X(v), r.top + Y(v)]; },
    edgeProbe() {   // a drawn edge and a point on it (page coordinates) that hovers it and no node
      const r = canvas.getBoundingClientRect();
      for (let t = 0; t < dN; t++) {
        const x1 = X(dP[t]), y1 = Y(dP[t]), x2 = X(dC[t]), y2 = Y(dC[t]);
        const bend = dKinds[t] & 1 ? 0.12 : -0.2;
        const cx = (x1 + x2) / 2 - (y2 - y1) * bend, cy = (y1 + y2) / 2 + (x2 - x1) * bend;
        const mx = (x1 + 2 * cx + x2) / 4, my = (y1 + 2 * cy + y2) / 4;
        if (mx > 0 && mx < W && my > 0 && my < Hc && nodeAt(mx, my) < 0 && edgeAt(mx, my) === t) return [t, [r.left + mx, r.top + my]];
      }
      return null;
    },
    cap: CAP, aggregateAbove: AGG_ABOVE,
  };
  window.MS.viewer = api;

  // ---- first draw ----
  resize();
  st.mode = chooseMode(); modeEl.value = st.mode;
  sizeEl.value = st.circuit; selectEl.value = st.circuit;
  update('first', true);
  api.firstDrawMs = performance.now();   // since navigation start, payload decoding included
  statusEl.dataset.firstDrawMs = api.firstDrawMs.toFixed(1);
  let resizeFrame = 0;
  new ResizeObserver(() => {
    if (resizeFrame) return;
    resizeFrame = requestAnimationFrame(() => { resizeFrame = 0; if (wrap.clientWidth !== W) { resize(); update('resize', false); } });
  }).observe(wrap);
})();
