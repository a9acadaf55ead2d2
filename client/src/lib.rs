//! rpx client (in progress).
