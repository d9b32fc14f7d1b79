// Running a charstream .onnx file in the page with onnxruntime-web's WebAssembly backend.
// The file carries its vocabulary and sizes in its metadata_props, read here straight from the
// protobuf bytes, so the page needs nothing but the file. The page keeps the recurrent state.

const ORT_URL = new URL("./ort/ort.wasm.min.mjs", import.meta.url);
let ortModule = null;

/** onnxruntime-web, loaded once from this server; throws a readable error when it is not installed. */
export async function loadOrt() {
  if (ortModule) return ortModule;
  let ort;
  try {
    ort = await import(ORT_URL.href);
  } catch (err) {
    throw new Error("onnxruntime-web is not installed on this server (run `make web`), so models cannot run in this browser");
  }
  ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one thread is what was measured
  ort.env.logLevel = "error";
  ortModule = ort;
  return ort;
}

// ---- a minimal protobuf reader: ModelProto.metadata_props (field 14) ---------------------------

function readVarint(bytes, pos) {
  let result = 0;
  let shift = 0;
  for (;;) {
    const b = bytes[pos++];
    result += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) return [result, pos];
    shift += 7;
  }
}

function fields(bytes, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) {
      [, pos] = readVarint(bytes, pos);
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else if (wire === 2) {
      let len;
      [len, pos] = readVarint(bytes, pos);
      visit(field, pos, pos + len);
      pos += len;
    } else {
      throw new Error(`not an ONNX file (protobuf wire type ${wire})`);
    }
  }
}

/** The metadata_props of an ONNX ModelProto, as a plain object. */
export function onnxMetadata(buffer) {
  const bytes = new Uint8Array(buffer);
  const utf8 = new TextDecoder();
  const meta = {};
  fields(bytes, 0, bytes.length, (field, start, end) => {
    if (field !== 14) return; // StringStringEntryProto { key = 1; value = 2; }
    let key = "";
    let value = "";
    fields(bytes, start, end, (f, s, e) => {
      if (f === 1) key = utf8.decode(bytes.subarray(s, e));
      if (f === 2) value = utf8.decode(bytes.subarray(s, e));
    });
    meta[key] = value;
  });
  return meta;
}

// ---- sampling: greedy is exact (first maximum, as numpy's argmax); the rest uses a seeded PRNG ---

/** mulberry32: a small seeded PRNG; the page's random stream, not the server's. */
export function makeRng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** Natural-log probabilities of the logits (a softmax at temperature 1). */
export function logSoftmax(logits) {
  let max = -Infinity;
  for (const v of logits) if (v > max) max = v;
  let sum = 0;
  for (const v of logits) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(logits, (v) => v - lse);
}

/** The k most likely next characters: {char: logprob}, most likely first. */
export function topCandidates(logits, vocab, k) {
  const lp = logSoftmax(logits);
  const order = Array.from(lp.keys()).sort((a, b) => lp[b] - lp[a]).slice(0, k);
  const out = {};
  for (const i of order) out[vocab[i]] = lp[i];
  return out;
}

export function sample(logits, params, rng) {
  const { temperature, topK, topP } = params;
  if (!(temperature > 0)) return argmax(logits);
  const z = Array.from(logits, (v) => v / temperature);
  let order = z.map((_, i) => i).sort((a, b) => z[b] - z[a]);
  if (topK > 0) order = order.slice(0, topK);
  const max = z[order[0]];
  let probs = order.map((i) => Math.exp(z[i] - max));
  let total = probs.reduce((a, b) => a + b, 0);
  if (topP < 1) {
    let mass = 0;
    let keep = 0;
    while (keep < probs.length && mass < topP * total) mass += probs[keep++];
    order = order.slice(0, Math.max(1, keep));
    probs = probs.slice(0, order.length);
    total = probs.reduce((a, b) => a + b, 0);
  }
  let r = rng() * total;
  for (let j = 0; j < order.length; j++) {
    r -= probs[j];
    if (r <= 0) return order[j];
  }
  return order[order.length - 1];
}

// ---- the model --------------------------------------------------------------------------------

export class BrowserModel {
  static async load(buffer) {
    const ort = await loadOrt();
    const meta = onnxMetadata(buffer);
    if (!meta.vocab) throw new Error("the file is not a charstream graph (no vocab in its metadata)");
    const session = await ort.InferenceSession.create(new Uint8Array(buffer), {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    });
    return new BrowserModel(ort, session, meta);
  }

  constructor(ort, session, meta) {
    this.ort = ort;
    this.session = session;
    this.vocab = JSON.parse(meta.vocab);
    this.index = new Map(this.vocab.map((ch, i) => [ch, i]));
    this.cell = meta.cell;
    this.layers = Number(meta.num_layers);
    this.hidden = Number(meta.hidden_size);
    this.variant = meta.variant || "fp32";
    this.stateNames = this.cell === "lstm" ? ["h", "c"] : ["h"];
  }

  zeroState() {
    const size = this.layers * this.hidden;
    return Object.fromEntries(this.stateNames.map((n) => [n, new Float32Array(size)]));
  }

  encode(text) {
    const missing = [...new Set([...text].filter((ch) => !this.index.has(ch)))];
    if (missing.length) throw new Error(`characters outside this model's vocabulary: ${missing.map((c) => JSON.stringify(c)).join(", ")}`);
    return [...text].map((ch) => this.index.get(ch));
  }

  /** Read ids (one call, seq = ids.length, as the server primes a prompt): logits [seq, vocab] and the new state. */
  async read(ids, state) {
    const { Tensor } = this.ort;
    const feeds = { tokens: new Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]) };
    for (const n of this.stateNames) feeds[n] = new Tensor("float32", state[n], [this.layers, 1, this.hidden]);
    const out = await this.session.run(feeds);
    const next = {};
    for (const n of this.stateNames) next[n] = out[`${n}_out`].data;
    return { logits: out.logits.data, state: next };
  }

  /** The logits of position `i` of a read's output. */
  row(logits, i) {
    const v = this.vocab.length;
    return logits.subarray(i * v, (i + 1) * v);
  }

  /** One unit's value in a state: layer-major, as the graph lays out [layers, 1, hidden]. */
  unitValue(state, layer, name, unit) {
    return state[name][layer * this.hidden + unit];
  }
}
