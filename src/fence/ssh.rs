//! SSH kill step (in progress).
