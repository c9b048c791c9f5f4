//! `strftime_now`: Python's `datetime.now().strftime` for the directives chat templates use.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::ErrorKind;

use super::python_json::fmt_error;

/// `strftime_now(format)`: the current time (UTC, the container's local time) formatted like
/// Python's `datetime.now().strftime(format)` for the directives templates use.
pub(super) fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(&format, CivilTime::from_unix(seconds))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday, as Python's `weekday()`.
    weekday: usize,
    /// 1-based day of the year.
    yearday: u32,
}

impl CivilTime {
    fn from_unix(seconds: u64) -> Self {
        let days = (seconds / 86_400) as i64;
        let secs = (seconds % 86_400) as u32;
        // Shift the epoch to 0000-03-01 so that leap days fall at the end of each year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let shifted_month = (5 * day_of_year + 2) / 153;
        let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
        let month = if shifted_month < 10 {
            shifted_month + 3
        } else {
            shifted_month - 9
        } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days_before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yearday = days_before_month[month as usize - 1] + day + u32::from(leap && month > 2);
        Self {
            year,
            month,
            day,
            hour: secs / 3_600,
            minute: secs / 60 % 60,
            second: secs % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as usize,
            yearday,
        }
    }
}

fn strftime(format: &str, t: CivilTime) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let month = MONTHS[t.month as usize - 1];
        let weekday = WEEKDAYS[t.weekday];
        let written = match chars.next() {
            Some('Y') => write!(out, "{}", t.year),
            Some('y') => write!(out, "{:02}", t.year.rem_euclid(100)),
            Some('m') => write!(out, "{:02}", t.month),
            Some('d') => write!(out, "{:02}", t.day),
            Some('e') => write!(out, "{:2}", t.day),
            Some('j') => write!(out, "{:03}", t.yearday),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('H') => write!(out, "{:02}", t.hour),
            Some('I') => write!(out, "{:02}", (t.hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{:02}", t.minute),
            Some('S') => write!(out, "{:02}", t.second),
            Some('%') => write!(out, "%"),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now does not support %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        };
        written.map_err(fmt_error)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_and_strftime() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208 of a leap year.
        let t = CivilTime::from_unix(1_722_000_309);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 7, 26, 13, 25, 9)
        );
        let out = strftime("%d %b %Y|%A %a %B %j %I%p %y %e %%", t).unwrap();
        assert_eq!(out, "26 Jul 2024|Friday Fri July 208 01PM 24 26 %");
        assert_eq!(CivilTime::from_unix(0).weekday, 3);
        let leap_day = CivilTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap_day.year, leap_day.month, leap_day.day), (2000, 2, 29));
        assert!(strftime("%Q", t).is_err());
    }
}
