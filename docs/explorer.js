// The VAE explorer: model.py's forward passes in plain JavaScript, on the weights explorer.py embeds in the page
// (int16 with a scale per row, the biases float32), computed in float64; and the page that shows them. No library
// and nothing fetched, so that it runs from file://. window.explorer is what tests/test_explorer.py calls;
// docs/explorer.md says how close to PyTorch's numbers these are, and why.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  let data;
  try {
    data = JSON.parse($("model").textContent);
  } catch {
    $("about").textContent = "No model in this page: python explorer.py --checkpoint out/ckpt.pt writes one.";
    return;
  }
  const cfg = data.config, cb = cfg.likelihood === "cb", N_PIXELS = 784, N_CLASSES = 10;
  const LOG_2PI = Math.log(2 * Math.PI);

  // --------------------------------------------------------------------------------------------- the weights

  function bytes(base64) {
    const s = atob(base64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  // A scatter plot's means in IEEE half precision, little-endian, to float32 (exactly: every float16 is a float32).
  function float16s(base64) {
    const b = bytes(base64), out = new Float32Array(b.length / 2);
    for (let i = 0; i < out.length; i++) {
      const h = b[2 * i] | (b[2 * i + 1] << 8), e = (h >> 10) & 31, f = h & 1023;
      const v = e === 0 ? f * 2 ** -24 : (1 + f / 1024) * 2 ** (e - 15); // subnormal, or normal (no inf here)
      out[i] = h & 0x8000 ? -v : v;
    }
    return out;
  }

  // Little-endian, as every browser's platform is. A layer's W is int16 with a float32 scale per row (W[o, i] =
  // w[o * nIn + i] * scale[o]), or float32 (scale 1): explorer.linear.
  const typed = (Type, base64) => new Type(bytes(base64).buffer);
  const layer = (l) => ({
    nIn: l.n_in,
    nOut: l.n_out,
    w: l.scale ? typed(Int16Array, l.w) : typed(Float32Array, l.w),
    scale: l.scale ? typed(Float32Array, l.scale) : new Float32Array(l.n_out).fill(1),
    b: typed(Float32Array, l.b),
  });
  const net = {
    encoder: data.encoder.map(layer),
    toMu: layer(data.to_mu),
    toLogvar: layer(data.to_logvar),
    decoder: data.decoder.map(layer),
    toLogits: layer(data.to_logits),
  };
  const act = cfg.activation === "relu" ? (v) => (v > 0 ? v : 0) : Math.tanh;

  // --------------------------------------------------------------------------------------------- the networks

  // nn.Linear on n rows at once, n a multiple of 4: h (n * nIn) -> W h + b (n * nOut), in float64. Four rows of h and
  // two rows of W at a time, so that every number loaded serves several products (three times as fast as one row by
  // one row); each row's scale is applied to its sums. An odd last row of W is paired with itself.
  function linear(l, h, n, activation = (v) => v) {
    const { nIn, nOut, w, scale, b } = l, out = new Float64Array(n * nOut);
    for (let o = 0; o < nOut; o += 2) {
      const p = Math.min(o + 1, nOut - 1), r0 = o * nIn, r1 = p * nIn;
      for (let k = 0; k < n; k += 4) {
        const h0 = k * nIn, h1 = h0 + nIn, h2 = h1 + nIn, h3 = h2 + nIn;
        let a0 = 0, a1 = 0, a2 = 0, a3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
        for (let i = 0; i < nIn; i++) {
          const u = w[r0 + i], v = w[r1 + i], x0 = h[h0 + i], x1 = h[h1 + i], x2 = h[h2 + i], x3 = h[h3 + i];
          (a0 += u * x0), (a1 += u * x1), (a2 += u * x2), (a3 += u * x3);
          (c0 += v * x0), (c1 += v * x1), (c2 += v * x2), (c3 += v * x3);
        }
        [a0, a1, a2, a3].forEach((s, m) => (out[(k + m) * nOut + o] = activation(s * scale[o] + b[o])));
        [c0, c1, c2, c3].forEach((s, m) => (out[(k + m) * nOut + p] = activation(s * scale[p] + b[p])));
      }
    }
    return out;
  }

  // model._mlp: every Linear followed by the activation (the heads, to_mu, to_logvar and to_logits, have none).
  const mlp = (layers, h, n) => layers.reduce((h, l) => linear(l, h, n, act), h);
  const padded = (n) => Math.ceil(n / 4) * 4;

  // What the networks read: n rows of k numbers with, for a conditional model, the one-hot label y beside each
  // (VAE.with_label), and zero rows up to a multiple of 4 (linear's blocks).
  function inputs(h, n, k, y) {
    const width = k + (cfg.conditional ? N_CLASSES : 0), out = new Float64Array(padded(n) * width);
    for (let r = 0; r < n; r++) {
      out.set(h.subarray(r * k, (r + 1) * k), r * width);
      if (cfg.conditional) out[r * width + k + y] = 1;
    }
    return out;
  }

  // VAE.encode: q(z|x) (or q(z|x, y)) = N(mu, diag(exp(logvar))) for one image x (784 values in [0, 1]).
  function encode(x, y = 0) {
    const h = mlp(net.encoder, inputs(Float64Array.from(x), 1, N_PIXELS, y), 4);
    const head = (l) => Array.from(linear(l, h, 4).subarray(0, 2)); // the first of the 4 rows is x's
    return { mu: head(net.toMu), logvar: head(net.toLogvar) };
  }

  // VAE.decode: n codes z (z1 z2 interleaved) -> the decoder's logits (n * 784, and the padding's after them).
  const decodeLogits = (z, n, y = 0) =>
    linear(net.toLogits, mlp(net.decoder, inputs(z, n, 2, y), padded(n)), padded(n));

  // --------------------------------------------------------------------------------------------- the densities

  const softplus = (l) => Math.max(l, 0) + Math.log1p(Math.exp(-Math.abs(l)));
  // model.cb_log_norm: log C = softplus(-a) - log(-expm1(-a) / a), a = |l|. In float64 the 0/0 at l = 0 needs only
  // the series' first two terms below a = 1e-4 (the next, 7 a^4 / 1440, is under 1e-18 there).
  const cbLogNorm = (a) => (a < 1e-4 ? Math.LN2 + (a * a) / 12 : softplus(-a) - Math.log(-Math.expm1(-a) / a));
  // model.cb_mean: 1 / (1 - e^-l) - 1 / l, and 1/2 + l/12 near 0 (the next term, l^3 / 720, is under 1e-15 there).
  const cbMean = (l) => (Math.abs(l) < 1e-4 ? 0.5 + l / 12 : -1 / Math.expm1(-l) - 1 / l);
  // VAE.mean: E[x|z] per pixel, the Bernoulli's probability or the continuous Bernoulli's mean (not lambda).
  const mean = (l) => (cb ? cbMean(l) : 1 / (1 + Math.exp(-l)));
  const logPrior = (z1, z2) => -0.5 * (z1 * z1 + z2 * z2) - LOG_2PI; // log N(z | 0, I)
  const kl = (q) => 0.5 * [0, 1].reduce((s, i) => s + q.mu[i] ** 2 + Math.exp(q.logvar[i]) - 1 - q.logvar[i], 0);

  // model.log_likelihood summed over the pixels, log p(x|z) for each of n codes z: x l - softplus(l) per pixel
  // (binary_cross_entropy_with_logits), plus log C(l) for the continuous Bernoulli. Decoded 64 codes at a time.
  function logLikelihood(x, z, n, y) {
    const out = new Float64Array(n);
    for (let start = 0; start < n; start += 64) {
      const m = Math.min(64, n - start), logits = decodeLogits(z.subarray(2 * start, 2 * (start + m)), m, y);
      for (let k = 0; k < m; k++) {
        let s = 0;
        for (let j = 0; j < N_PIXELS; j++) {
          const l = logits[k * N_PIXELS + j];
          s += x[j] * l - softplus(l) + (cb ? cbLogNorm(Math.abs(l)) : 0);
        }
        out[start + k] = s;
      }
    }
    return out;
  }

  // scoring.exact_elbo: E_q[log p(x|z)] by Gauss-Hermite quadrature under q, on the nodes explorer.py embeds
  // (z = mu + sqrt(2) sd t, weight w_i w_j / pi), and KL(q || p(z)) in closed form: no sampling, in nats.
  function elbo(x, y = 0) {
    const q = encode(x, y), { t, w } = data.hermite, n = t.length, z = new Float64Array(2 * n * n);
    const sd = q.logvar.map((v) => Math.exp(0.5 * v));
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) {
        z[2 * (i * n + j)] = q.mu[0] + Math.SQRT2 * sd[0] * t[i];
        z[2 * (i * n + j) + 1] = q.mu[1] + Math.SQRT2 * sd[1] * t[j];
      }
    }
    const logp = logLikelihood(x, z, n * n, y);
    let expected = 0;
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) expected += ((w[i] * w[j]) / Math.PI) * logp[i * n + j];
    return { ...q, recon: -expected, kl: kl(q), elbo: expected - kl(q) };
  }

  // scoring.posterior_grid, coarser: log p(x, z) on a GRID x GRID grid centred on q's mean, HALF_WIDTH of q's sd
  // either way, doubled (at most DOUBLINGS times) until the border is NEGLIGIBLE nats below the peak; log p(x) by
  // the trapezoid rule (PosteriorGrid.log_px). The width is found from the border and every 5th point (a border that
  // far below the largest of those is as far below the peak at least), then the grid is computed a row at a time,
  // yielding to the page every 50 ms; a newer call stops an older one.
  const GRID = 101, HALF_WIDTH = 8, NEGLIGIBLE = 30, DOUBLINGS = 6;
  let gridJob = 0;
  const pause = () => new Promise((resolve) => setTimeout(resolve));

  async function posterior(x, y = 0, progress = () => {}) {
    const job = ++gridJob, q = encode(x, y), sd = q.logvar.map((v) => Math.exp(0.5 * v));
    const logJointAt = (points) => {
      const logp = logLikelihood(x, Float64Array.from(points.flat()), points.length, y);
      return points.map(([z1, z2], k) => logp[k] + logPrior(z1, z2));
    };
    let width = HALF_WIDTH, z1, z2;
    for (let doubling = 0; ; doubling++, width *= 2) {
      const axis = (a) => Array.from({ length: GRID }, (_, i) => q.mu[a] + width * sd[a] * ((2 * i) / (GRID - 1) - 1));
      [z1, z2] = [axis(0), axis(1)];
      if (doubling === DOUBLINGS) break;
      const ring = [];
      for (let k = 0; k < GRID - 1; k++) {
        ring.push([z1[k], z2[0]], [z1[GRID - 1], z2[k]], [z1[GRID - 1 - k], z2[GRID - 1]], [z1[0], z2[GRID - 1 - k]]);
      }
      const coarse = []; // every 5th point of the grid each way: a peak that the full grid can only exceed
      for (let i = 0; i < GRID; i += 5) for (let j = 0; j < GRID; j += 5) coarse.push([z1[i], z2[j]]);
      const values = logJointAt([...coarse, ...ring]);
      if (Math.max(...values) - Math.max(...values.slice(coarse.length)) >= NEGLIGIBLE) break;
      progress(0, 2 * width);
      await pause();
      if (job !== gridJob) return null;
    }
    const logJoint = new Float64Array(GRID * GRID); // [i * GRID + j] at (z1[i], z2[j])
    let yielded = performance.now();
    for (let i = 0; i < GRID; i++) {
      logJoint.set(logJointAt(z2.map((v) => [z1[i], v])), i * GRID);
      if (performance.now() - yielded > 50) {
        progress((i + 1) / GRID, width);
        await pause();
        if (job !== gridJob) return null;
        yielded = performance.now();
      }
    }
    let peak = -Infinity, border = -Infinity;
    logJoint.forEach((v, k) => {
      const i = Math.floor(k / GRID), j = k % GRID;
      peak = Math.max(peak, v);
      if (i === 0 || j === 0 || i === GRID - 1 || j === GRID - 1) border = Math.max(border, v);
    });
    const cell = ((z1[GRID - 1] - z1[0]) * (z2[GRID - 1] - z2[0])) / (GRID - 1) ** 2;
    const edge = (i) => (i === 0 || i === GRID - 1 ? 0.5 : 1); // the border's cells at half weight, corners a quarter
    let sum = 0;
    logJoint.forEach((v, k) => (sum += edge(Math.floor(k / GRID)) * edge(k % GRID) * Math.exp(v - peak)));
    return { ...q, z1, z2, logJoint, peak, width, logpx: peak + Math.log(sum * cell), borderNats: peak - border };
  }

  // p(y|x) = exp ELBO(x|y) / sum_y' exp ELBO(x|y'): evaluate.py's generative classifier (p(x|y) under a uniform
  // prior on y), with the page's deterministic ELBO in place of log p(x|y). A label at a time; a newer call stops it.
  let classJob = 0;
  async function classify(x) {
    const job = ++classJob, bounds = [];
    for (let y = 0; y < N_CLASSES; y++) {
      bounds.push(elbo(x, y).elbo);
      await pause();
      if (job !== classJob) return null;
    }
    const top = Math.max(...bounds), e = bounds.map((b) => Math.exp(b - top)), sum = e.reduce((a, b) => a + b);
    return e.map((v) => v / sum);
  }

  // --------------------------------------------------------------------------------------------- the page

  const TAB10 = "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf".split(" ");
  const BRUSH = 1.2; // a drawn pixel is 1 where the pen passed within 1.2 pixel widths of its centre, else 0
  const fixed = (v, d = 2) => v.toFixed(d);
  const means = float16s(data.means), meanLabels = bytes(data.labels), images = bytes(data.images);
  const drawing = new Float64Array(N_PIXELS);
  const state = { y: 0, pointer: null, q: null, grid: null, testImage: -1 };
  // What the page calls things: a conditional model's are given the label y.
  const [qText, pxText, pzText] = cfg.conditional ? ["q(z|x, y)", "p(x|y)", "p(z|x, y)"] : ["q(z|x)", "p(x)", "p(z|x)"];

  // A view of the latent plane on a canvas: lim = [z1 lo, z1 hi, z2 lo, z2 hi] in the box inside the margins.
  function view(canvas, lim) {
    const W = canvas.width, H = canvas.height, box = [40, 8, W - 48, H - 48];
    const sx = box[2] / (lim[1] - lim[0]), sy = box[3] / (lim[3] - lim[2]);
    const px = (z1) => box[0] + (z1 - lim[0]) * sx, py = (z2) => box[1] + box[3] - (z2 - lim[2]) * sy;
    const z = (x, y) => [lim[0] + (x - box[0]) / sx, lim[2] + (box[1] + box[3] - y) / sy];
    return { canvas, ctx: canvas.getContext("2d"), lim, box, sx, sy, px, py, z };
  }

  function axes(v) {
    const { ctx, lim, box } = v;
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, v.canvas.width, v.canvas.height);
    ctx.strokeStyle = ctx.fillStyle = "#333";
    ctx.font = "11px sans-serif";
    ctx.strokeRect(...box);
    for (const a of [0, 1]) {
      const lo = lim[2 * a], hi = lim[2 * a + 1], raw = (hi - lo) / 7, p = 10 ** Math.floor(Math.log10(raw));
      const step = [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw);
      for (let k = Math.ceil(lo / step); k * step <= hi; k++) {
        const label = String(+(k * step).toFixed(6));
        ctx.textAlign = a ? "right" : "center";
        const x = v.px(k * step), y = v.py(k * step), bottom = box[1] + box[3];
        if (a) ctx.fillText(label, box[0] - 4, y + 4), ctx.fillRect(box[0] - 3, y, 3, 1);
        else ctx.fillText(label, x, bottom + 14), ctx.fillRect(x, bottom, 1, 3);
      }
    }
    ctx.textAlign = "center";
    ctx.fillText("z₁", box[0] + box[2] / 2, box[1] + box[3] + 30);
    ctx.fillText("z₂", 10, box[1] + box[3] / 2);
  }

  function scatter(v) {
    v.ctx.globalAlpha = 0.7;
    for (let k = 0; k < meanLabels.length; k++) {
      v.ctx.fillStyle = TAB10[meanLabels[k]];
      v.ctx.fillRect(v.px(means[2 * k]) - 1, v.py(means[2 * k + 1]) - 1, 2.5, 2.5);
    }
    v.ctx.globalAlpha = 1;
  }

  // p(z|x) relative to its peak as the opacity of one colour (a white-to-purple ramp on white), under q's ellipses.
  function heatMap(v, g) {
    const image = new ImageData(GRID, GRID);
    g.logJoint.forEach((value, k) => {
      const p = (GRID - 1 - (k % GRID)) * GRID + Math.floor(k / GRID); // z1 to the right, z2 upwards
      image.data.set([63, 0, 125, Math.round(235 * Math.exp(value - g.peak))], 4 * p);
    });
    const tile = document.createElement("canvas");
    tile.width = tile.height = GRID;
    tile.getContext("2d").putImageData(image, 0, 0);
    const d1 = (g.z1[1] - g.z1[0]) / 2, d2 = (g.z2[1] - g.z2[0]) / 2; // the cells' centres are the grid's points
    const x0 = v.px(g.z1[0] - d1), y0 = v.py(g.z2[GRID - 1] + d2);
    v.ctx.drawImage(tile, x0, y0, v.px(g.z1[GRID - 1] + d1) - x0, v.py(g.z2[0] - d2) - y0);
  }

  function ellipses(v, q) {
    const { ctx } = v, sd = q.logvar.map((lv) => Math.exp(0.5 * lv)), x = v.px(q.mu[0]), y = v.py(q.mu[1]);
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1.5;
    for (const k of [1, 2]) {
      ctx.setLineDash(k === 1 ? [] : [4, 3]);
      ctx.beginPath();
      ctx.ellipse(x, y, k * sd[0] * v.sx, k * sd[1] * v.sy, 0, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.fillStyle = "#000";
    ctx.fillRect(x - 4, y - 0.75, 8, 1.5), ctx.fillRect(x - 0.75, y - 4, 1.5, 8);
    ctx.lineWidth = 1;
  }

  // The two views: the whole plane, and one around q (its 3-sd box, or where p(z|x) is above e^-9 of its peak).
  const plane = view($("plane"), data.plane);
  let zoom = view($("zoom"), [-1, 1, -1, 1]);
  const background = document.createElement("canvas");
  background.width = plane.canvas.width;
  background.height = plane.canvas.height;
  axes(plane), scatter(plane);
  background.getContext("2d").drawImage(plane.canvas, 0, 0);

  function zoomLimits() {
    const { q, grid } = state, sd = q.logvar.map((lv) => Math.exp(0.5 * lv));
    let lo = [q.mu[0] - 3 * sd[0], q.mu[1] - 3 * sd[1]], hi = [q.mu[0] + 3 * sd[0], q.mu[1] + 3 * sd[1]];
    if (grid) {
      grid.logJoint.forEach((v, k) => {
        if (v < grid.peak - 9) return;
        const z = [grid.z1[Math.floor(k / GRID)], grid.z2[k % GRID]];
        lo = lo.map((l, a) => Math.min(l, z[a])), (hi = hi.map((h, a) => Math.max(h, z[a])));
      });
    }
    const c = [0, 1].map((a) => (lo[a] + hi[a]) / 2), r = 0.55 * Math.max(hi[0] - lo[0], hi[1] - lo[1]); // square
    return [c[0] - r, c[0] + r, c[1] - r, c[1] + r];
  }

  function redraw() {
    plane.ctx.drawImage(background, 0, 0);
    const views = [plane];
    if (state.q) {
      zoom = view($("zoom"), zoomLimits());
      axes(zoom), views.push(zoom);
    }
    for (const v of views) {
      v.ctx.save();
      v.ctx.beginPath();
      v.ctx.rect(...v.box);
      v.ctx.clip();
      if (state.grid) heatMap(v, state.grid);
      if (state.q) ellipses(v, state.q);
      if (state.pointer) {
        v.ctx.strokeStyle = "#d00";
        v.ctx.strokeRect(v.px(state.pointer[0]) - 3, v.py(state.pointer[1]) - 3, 6, 6);
      }
      v.ctx.restore();
    }
  }

  function showDigit(canvas, values) {
    const image = new ImageData(28, 28);
    values.forEach((v, k) => image.data.set([255 * v, 255 * v, 255 * v, 255], 4 * k)); // white on black, as plots/
    canvas.getContext("2d").putImageData(image, 0, 0);
  }

  const decode = (z, y = state.y) => Array.from(decodeLogits(Float64Array.from(z), 1, y).subarray(0, N_PIXELS), mean);

  function pointAt(v, e) {
    const c = v.canvas, z = v.z((e.offsetX * c.width) / c.clientWidth, (e.offsetY * c.height) / c.clientHeight);
    state.pointer = z;
    showDigit($("decoded"), decode(z));
    $("pointer").textContent = `z = (${fixed(z[0])}, ${fixed(z[1])}), log p(z) = ${fixed(logPrior(...z))}`;
    redraw();
  }
  $("plane").addEventListener("pointermove", (e) => pointAt(plane, e));
  $("zoom").addEventListener("pointermove", (e) => pointAt(zoom, e));

  // The drawn digit changed: q, its reconstruction and the ellipses at once; the ELBO (and p(y|x)) once the pen is
  // lifted; p(z|x) when asked for.
  async function changed(final) {
    showDigit($("draw"), drawing);
    state.grid = null;
    gridJob++, classJob++; // stops a computation of the previous drawing
    $("exact").textContent = "";
    $("progress").value = 0;
    if (!drawing.some((v) => v > 0)) {
      state.q = null;
      $("q").textContent = `${qText}: draw a digit`;
      $("bound").textContent = $("classes").textContent = "";
      return redraw();
    }
    const { mu, logvar } = (state.q = encode(drawing, state.y)), sd = logvar.map((lv) => Math.exp(0.5 * lv));
    showDigit($("recon"), decode(mu));
    const [m1, m2, s1, s2] = [...mu.map((v) => fixed(v)), ...sd.map((v) => fixed(v, 3))];
    $("q").textContent = `${qText}: mean (${m1}, ${m2}), sd (${s1}, ${s2})`;
    $("bound").textContent = final ? "" : "−ELBO: when the pen is lifted";
    redraw();
    if (!final) return;
    const b = elbo(drawing, state.y);
    $("bound").innerHTML =
      `−ELBO = <span id="recon-value">${fixed(b.recon)}</span> (reconstruction)` +
      ` + <span id="kl-value">${fixed(b.kl)}</span> (KL) = <span id="neg-elbo-value">${fixed(-b.elbo)}</span> nats`;
    if (!cfg.conditional) return;
    $("classes").textContent = "p(y|x) ∝ exp ELBO(x|y): computing";
    const p = await classify(drawing);
    const bar = (v, d) => `<div>${d} <b style="width:${150 * v}px"></b>${fixed(100 * v, 1)}%</div>`;
    if (p) $("classes").innerHTML = "p(y|x) ∝ exp ELBO(x|y)" + p.map(bar).join("");
  }

  async function showPosterior() {
    if (!state.q) return;
    const b = elbo(drawing, state.y);
    const g = await posterior(drawing, state.y, (done, sds) => {
      $("progress").value = done;
      $("exact").textContent = `log p(x, z) on a ${GRID}×${GRID} grid, ±${sds} sd of q: ${Math.round(100 * done)}%`;
    });
    if (!g) return;
    state.grid = g;
    $("progress").value = 1;
    $("exact").innerHTML =
      `log ${pxText} = <span id="log-px-value">${fixed(g.logpx)}</span> nats (${GRID}×${GRID} grid, ±${g.width} sd` +
      ` of q, its border ${Math.round(g.borderNats)} nats below the peak); the gap log ${pxText} − ELBO =` +
      ` KL(${qText} ‖ ${pzText}) = <span id="gap-value">${fixed(g.logpx - b.elbo, 3)}</span> nats`;
    redraw();
  }

  // Drawing: strokes stamped along the pointer's path every quarter pixel; mouse, pen and touch alike.
  const pen = { at: null };
  function stroke(e) {
    const c = $("draw"), x = (e.offsetX * 28) / c.clientWidth, y = (e.offsetY * 28) / c.clientHeight;
    const [x0, y0] = pen.at ?? [x, y], steps = Math.ceil(Math.hypot(x - x0, y - y0) * 4) + 1;
    for (let s = 0; s < steps; s++) {
      const px = x0 + ((x - x0) * (s + 1)) / steps, py = y0 + ((y - y0) * (s + 1)) / steps;
      for (let i = Math.max(0, Math.floor(py - BRUSH)); i <= Math.min(27, Math.floor(py + BRUSH)); i++) {
        for (let j = Math.max(0, Math.floor(px - BRUSH)); j <= Math.min(27, Math.floor(px + BRUSH)); j++) {
          if (Math.hypot(j + 0.5 - px, i + 0.5 - py) <= BRUSH) drawing[i * 28 + j] = 1;
        }
      }
    }
    pen.at = [x, y];
    changed(false);
  }
  const lift = () => pen.at && ((pen.at = null), changed(true)), NOTE = $("drawn-note").textContent;
  const press = (e) => (e.target.setPointerCapture(e.pointerId), (pen.at = null), stroke(e));
  $("draw").addEventListener("pointerdown", press);
  $("draw").addEventListener("pointermove", (e) => pen.at && stroke(e));
  $("draw").addEventListener("pointerup", lift);
  $("draw").addEventListener("pointercancel", lift);
  $("clear").onclick = () => (drawing.fill(0), ($("drawn-note").textContent = NOTE), changed(true));
  $("test-image").onclick = () => {
    const k = (state.testImage = (state.testImage + 1) % data.image_labels.length), d = data.image_labels[k];
    drawing.set(Array.from(images.subarray(k * N_PIXELS, (k + 1) * N_PIXELS), (v) => v / 255));
    $("drawn-note").textContent = `The first test image of a ${d}, as the model is scored on it (${cfg.pixels}).`;
    if (cfg.conditional) select(d);
    changed(true);
  };
  $("posterior").onclick = showPosterior;

  // The legend; for a conditional model, also the label y the plane and the drawn digit are decoded with.
  function select(d) {
    state.y = d;
    document.querySelectorAll(".legend button").forEach((b, k) => b.classList.toggle("on", k === d));
    $("decoded-title").textContent = `E[x|z, y = ${d}] under the pointer`;
  }
  $("legend").innerHTML = (cfg.conditional ? "decode with y = " : "digit: ") +
    TAB10.map((c, d) => `<i style="background:${c}"></i>${d}`)
      .map((label) => (cfg.conditional ? `<button>${label}</button>` : `${label} `))
      .join("");
  document.querySelectorAll(".legend button").forEach((b, d) => (b.onclick = () => (select(d), changed(true))));
  if (cfg.conditional) select(0);

  const likelihood = cb ? "continuous-Bernoulli" : "Bernoulli";
  const activation = { relu: "ReLU", tanh: "tanh" }[cfg.activation];
  $("posterior-title").textContent = `The true posterior ${pzText}`;
  $("plane-title").textContent = `Test set: posterior means of ${qText}, every 5th test image`;
  const nodes = data.hermite.t.length;
  $("about").textContent =
    `${cfg.conditional ? "A conditional VAE" : "A VAE"}: 784-${cfg.hidden_dims.join("-")}-2 ${activation} MLPs,` +
    ` a ${likelihood} decoder, trained on ${cfg.pixels} pixels for ${cfg.epoch} epochs. Move over the plane to` +
    ` decode z; draw a digit (a pixel is 1 where the pen passed within ${BRUSH} pixel widths of its centre, else 0)` +
    ` to see ${qText}, its 1- and 2-sd ellipses and its ELBO (E_q[log p(x|z)] by ${nodes}×${nodes} Gauss-Hermite` +
    ` quadrature, the KL in closed form); then compute the true posterior on a grid, log ${pxText} by the` +
    ` trapezoid rule.`;
  redraw();

  window.explorer = {
    decode,
    encode,
    elbo,
    classify,
    posterior: async (x, y = 0) => {
      const g = await posterior(Float64Array.from(x), y);
      return { z1: g.z1, z2: g.z2, logpx: g.logpx, borderNats: g.borderNats };
    },
    drawing: () => Array.from(drawing),
    grid: () => state.grid && { z1: state.grid.z1, z2: state.grid.z2, logpx: state.grid.logpx, y: state.y },
    ready: true,
  };
})();
