//! rpx magics (in progress).
