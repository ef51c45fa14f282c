// Autosave: one save at a time, the latest drawing always saved last, failed saves retried with backoff
// (except after a final error, e.g. a revoked link: then the saver stops until the next change or retryNow).
// No DOM: the page passes `save()` and `onState(state)`.

/**
 * @param {object} opts
 * @param {() => Promise<object>} opts.save saves the current drawing (read at call time); resolves to the record
 * @param {(s: {state: "saved"|"saving"|"failed"|"stopped", record?: object, error?: any, retryIn?: number})
 *   => void} opts.onState "stopped": a final error, not retried (the change stays unsaved: `dirty`, `stopped`)
 * @param {number[]} [opts.backoff] seconds before each retry; the last value repeats
 * @param {(error: any) => Promise<void>} [opts.beforeRetry] e.g. re-resolve the service after a failure
 * @param {(error: any) => boolean} [opts.isFinal] errors that retrying cannot mend (default: none)
 */
export class AutoSaver {
  constructor({ save, onState, backoff = [1, 2, 4, 8, 15, 30], beforeRetry = async () => {}, isFinal = () => false }) {
    this.save = save;
    this.onState = onState;
    this.backoff = backoff;
    this.beforeRetry = beforeRetry;
    this.isFinal = isFinal;
    this.pending = false; // a change not saved yet
    this.running = null; // the promise of the save loop
    this.failures = 0;
    this.timer = null;
    this.lastError = null;
    this.stopped = null; // the final error that stopped the retries
    this.generation = 0; // bumped by reset(): a loop of an older image stops quietly
  }

  /** True while some change is not saved yet (saving, waiting for a retry, or failed). */
  get dirty() { return this.pending || this.running !== null || this.timer !== null; }

  /** Record a change; resolves when the saver is idle again (saved, or failed and waiting for a retry). */
  changed() {
    this.pending = true;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    if (!this.running) this.running = this._loop();
    return this.running;
  }

  /** Retry now (e.g. the user clicked the failed status). */
  retryNow() {
    if (this.timer) { clearTimeout(this.timer); this.timer = null; this.pending = true; }
    if (!this.running && this.pending) this.running = this._loop();
    return this.running || Promise.resolve();
  }

  /** Forget everything (another image is shown). */
  reset() {
    this.generation++;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.pending = false;
    this.failures = 0;
    this.stopped = null;
    this.running = null;
  }

  async _loop() {
    const generation = this.generation;
    this.stopped = null;
    while (this.pending && generation === this.generation) {
      this.pending = false;
      this.onState({ state: "saving" });
      try {
        if (this.failures) await this.beforeRetry(this.lastError);
        const record = await this.save();
        if (generation !== this.generation) return;
        this.failures = 0;
        this.lastError = null;
        if (!this.pending) this.onState({ state: "saved", record });
      } catch (error) {
        if (generation !== this.generation) return;
        this.pending = true; // the drawing is kept and saved again
        this.lastError = error;
        if (this.isFinal(error)) { // no retry: the next change (or retryNow) tries once more
          this.stopped = error;
          this.onState({ state: "stopped", error });
          break;
        }
        const wait = this.backoff[Math.min(this.failures, this.backoff.length - 1)];
        this.failures++;
        this.onState({ state: "failed", error, retryIn: wait });
        this.timer = setTimeout(() => {
          this.timer = null;
          if (!this.running && generation === this.generation) this.running = this._loop();
        }, wait * 1000);
        break;
      }
    }
    if (generation === this.generation) this.running = null;
  }
}
