//! Sans-IO Tandem protocol (work in progress).
