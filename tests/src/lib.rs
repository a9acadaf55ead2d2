//! Helpers for rpx black-box tests.
