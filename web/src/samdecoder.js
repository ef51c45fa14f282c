// SAM prompts decoded in the browser: onnxruntime-web runs the ONNX prompt decoder of the annotator service
// (`sam_decoder`) on the image embedding (`sam_embedding`, BioImage.IO Colab's form), as BioImage.IO Colab
// and CVAT do. onnxruntime-web is loaded on first use (its own chunk); its wasm files are in assets/ort/.

let ortPromise = null;
let quietAborts = false;

// A wasm runtime that cannot load makes emscripten abort in a promise of its own as well as rejecting
// InferenceSession.create (which the page handles: SAM falls back to the server); keep that second report quiet.
window.addEventListener("unhandledrejection", (e) => {
  const text = String((e.reason && e.reason.message) || e.reason);
  if (quietAborts && text.startsWith("Aborted(")) e.preventDefault();
});

/** onnxruntime-web's wasm build, configured to load its files from `base` (a URL ending in "/"). */
export function loadOrt(base) {
  quietAborts = true;
  if (!ortPromise) {
    ortPromise = import("onnxruntime-web/wasm").then((ort) => {
      ort.env.wasm.wasmPaths = base;
      ort.env.wasm.numThreads = 1; // no cross-origin isolation: no SharedArrayBuffer, no threads
      ort.env.wasm.proxy = false;
      return ort;
    });
    ortPromise.catch(() => { ortPromise = null; });
  }
  return ortPromise;
}

/** hypha-rpc ndarray ({_rtype: "ndarray", _rvalue, _rshape, _rdtype: "float32"}) -> {data: Float32Array, shape}. */
export function float32Array(arr) {
  if (!arr || arr._rtype !== "ndarray" || arr._rdtype !== "float32") {
    throw new Error(`expected a float32 ndarray, got ${arr && (arr._rdtype || typeof arr)}`);
  }
  const bytes = arr._rvalue instanceof Uint8Array ? arr._rvalue : new Uint8Array(arr._rvalue);
  const copy = bytes.slice(); // aligned copy
  return { data: new Float32Array(copy.buffer, 0, copy.byteLength / 4), shape: arr._rshape };
}

/** The decoder's size of the resized image: round(H * s), round(W * s) with s = longSide / max(H, W). */
export function inputSize(H, W, longSide) {
  const s = longSide / Math.max(H, W);
  return [Math.floor(H * s + 0.5), Math.floor(W * s + 0.5)];
}

/**
 * The decoder's `point_coords` and `point_labels` for image-pixel prompts, exactly as the server maps them
 * (services/sam/transforms.py): x * w / W - 0.5, y * h / H - 0.5 (SAM adds 0.5 back: pixel centres), per
 * axis with the rounded resized size (h, w). Points get a padding point (label -1) unless a box is given;
 * the box's corners are labels 2 and 3.
 * @param {{points?: number[][], labels?: number[], box?: number[]}} prompt image pixels [x, y]
 * @param {number[]} imageShape [H, W]
 * @param {number} longSide the model's input size (1024 for published SAMs) = sam_scale * max(H, W)
 * @returns {{coords: Float32Array, labels: Float32Array, n: number}} coords (1, n, 2), labels (1, n)
 */
export function decoderPrompt(prompt, imageShape, longSide) {
  const [H, W] = imageShape;
  const [h, w] = inputSize(H, W, longSide);
  const sx = w / W;
  const sy = h / H;
  const coords = [];
  const labels = [];
  (prompt.points || []).forEach(([x, y], i) => {
    coords.push(x * sx - 0.5, y * sy - 0.5);
    labels.push(prompt.labels[i]);
  });
  if (prompt.box) {
    const [x0, y0, x1, y1] = prompt.box;
    coords.push(x0 * sx - 0.5, y0 * sy - 0.5, x1 * sx - 0.5, y1 * sy - 0.5);
    labels.push(2, 3);
  } else {
    coords.push(0, 0);
    labels.push(-1);
  }
  return { coords: Float32Array.from(coords), labels: Float32Array.from(labels), n: labels.length };
}

/** A loaded ONNX prompt decoder and the embedding of one image. */
export class BrowserDecoder {
  /**
   * @param {object} ort onnxruntime-web module
   * @param {Uint8Array} model ONNX bytes of the decoder
   */
  static async create(ort, model) {
    const session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
    return new BrowserDecoder(ort, session);
  }

  constructor(ort, session) {
    this.ort = ort;
    this.session = session;
    this.embedding = null;
  }

  /** `sam_embedding`'s answer: {features (1, C, g, g) float32 ndarray, original_image_shape, sam_scale, mask_threshold}. */
  setEmbedding(imageId, answer) {
    const { data, shape } = float32Array(answer.features);
    const [H, W] = answer.original_image_shape;
    this.embedding = {
      imageId, shape: [H, W], threshold: Number(answer.mask_threshold || 0),
      longSide: Math.round(answer.sam_scale * Math.max(H, W)),
      features: new this.ort.Tensor("float32", data, shape),
      lowRes: 4 * shape[2],
    };
  }

  /**
   * Decode a prompt on the current embedding.
   * @returns {Promise<{mask: Float32Array, width: number, height: number, threshold: number, score: number}>}
   *   mask logits (H * W) row-major in image pixels
   */
  async decode(prompt) {
    const e = this.embedding;
    if (!e) throw new Error("no image embedding loaded");
    const { coords, labels, n } = decoderPrompt(prompt, e.shape, e.longSide);
    const T = this.ort.Tensor;
    const feeds = {
      image_embeddings: e.features,
      point_coords: new T("float32", coords, [1, n, 2]),
      point_labels: new T("float32", labels, [1, n]),
      mask_input: new T("float32", new Float32Array(e.lowRes * e.lowRes), [1, 1, e.lowRes, e.lowRes]),
      has_mask_input: new T("float32", new Float32Array([0]), [1]),
      orig_im_size: new T("float32", new Float32Array(e.shape), [2]),
    };
    const out = await this.session.run(feeds);
    const masks = out.masks;
    const [height, width] = masks.dims.slice(-2);
    return { mask: masks.data, width, height, threshold: e.threshold, score: out.iou_predictions.data[0] };
  }
}
