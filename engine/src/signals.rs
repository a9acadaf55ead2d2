//! Reading the signal of a `signal_request` (a number or a name from `rpx_protocol::signals`) and
//! human descriptions of how a process ended.

use rpx_protocol::signals;
use serde_json::Value;

/// Parse a signal given as a number or a name (`2`, `"2"`, `"SIGINT"`, `"INT"`, `"sigint"`).
pub fn parse_signal(v: &Value) -> Result<i32, String> {
    let valid = |n: i64| -> Result<i32, String> {
        if (1..=i64::from(signals::MAX_SIGNAL)).contains(&n) {
            Ok(n as i32)
        } else {
            Err(format!("signal number {n} is out of range (1-{})", signals::MAX_SIGNAL))
        }
    };
    match v {
        Value::Number(n) => valid(n.as_i64().ok_or_else(|| format!("signal {n} is not an integer"))?),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<i64>() {
                return valid(n);
            }
            signals::lookup(s)
                .map(|(_, num)| num)
                .ok_or_else(|| format!("unknown signal name {s:?} (use a number or a name such as SIGINT)"))
        }
        other => Err(format!("signal must be an integer or a name, got {other}")),
    }
}

/// Describe an exit status: `exit status 3`, `signal 6 (SIGABRT)`.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        describe_signal(sig)
    } else {
        format!("{status}")
    }
}

/// `signal 6 (SIGABRT)`.
pub fn describe_signal(sig: i32) -> String {
    format!("signal {}", signals::describe(sig))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_names() {
        assert_eq!(parse_signal(&json!(2)), Ok(libc::SIGINT));
        assert_eq!(parse_signal(&json!("2")), Ok(libc::SIGINT));
        assert_eq!(parse_signal(&json!("SIGINT")), Ok(libc::SIGINT));
        assert_eq!(parse_signal(&json!("int")), Ok(libc::SIGINT));
        assert_eq!(parse_signal(&json!("SIGKILL")), Ok(9));
        assert_eq!(parse_signal(&json!(" sigterm ")), Ok(libc::SIGTERM));
    }

    #[test]
    fn bad_signals_are_errors() {
        assert!(parse_signal(&json!("SIGNOPE")).unwrap_err().contains("unknown signal name"));
        assert!(parse_signal(&json!(0)).is_err());
        assert!(parse_signal(&json!(99)).is_err());
        assert!(parse_signal(&json!(1.5)).is_err());
        assert!(parse_signal(&json!(null)).is_err());
    }

    #[test]
    fn exit_descriptions() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(&std::process::ExitStatus::from_raw(6)), "signal 6 (SIGABRT)");
        assert_eq!(describe_exit(&std::process::ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(describe_signal(11), "signal 11 (SIGSEGV)");
    }
}
