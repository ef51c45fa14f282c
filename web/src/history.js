// Undo/redo over snapshots of the annotation (pure: no DOM, no OpenLayers).

/**
 * A linear history of snapshots (any immutable value, e.g. a FeatureCollection as JSON text).
 * `reset(s)` starts over at s; `push(s)` records a change (dropping the redo branch; equal snapshots are
 * ignored); `undo()` / `redo()` return the snapshot to restore, or null when there is none.
 */
export class History {
  constructor(limit = 200) {
    this.limit = limit;
    this.past = [];
    this.future = [];
    this.current = null;
  }

  reset(snapshot) {
    this.past = [];
    this.future = [];
    this.current = snapshot;
  }

  push(snapshot) {
    if (snapshot === this.current) return false;
    if (this.current !== null) this.past.push(this.current);
    if (this.past.length > this.limit) this.past.shift();
    this.future = [];
    this.current = snapshot;
    return true;
  }

  undo() {
    if (!this.past.length) return null;
    this.future.push(this.current);
    this.current = this.past.pop();
    return this.current;
  }

  redo() {
    if (!this.future.length) return null;
    this.past.push(this.current);
    this.current = this.future.pop();
    return this.current;
  }

  get canUndo() { return this.past.length > 0; }
  get canRedo() { return this.future.length > 0; }
}
